"""The Markdown page of benchmarks/gpu_evidence.py's result, and the issue's three goals read off it."""

GOALS = (  # (name, target, comparison, format) — issue 19
    ("training: tinyddpm (best mode) / diffusers bf16 + compile (faster layout), img/s", 1.5, ">=", ".2f", "×"),
    ("sampling: tinyddpm (best variant) / diffusers (best variant and layout), image-steps/s", 1.5, ">=", ".2f",
     "×"),
    ("quality: cats FID-1k / floor after the short run", 1.15, "<=", ".2f", "×"),
    # Held-out test images are flagged 5 % of the time by construction; "clean" here: at most twice that.
    ("memorisation: generated cats flagged as near-copies (worst of Inception / pixels)", 0.10, "<=", ".1%", ""),
)


def _num(v, spec=".1f", suffix=""):
    return "—" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, spec) + suffix


def _why(row):
    """'skipped: …' / 'failed: …' for a row that has no figures, else None."""
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"failed: {row['error']}"
    return None


def _best(rows, systems, key, only=None):
    vals = [r[key] for name, r in rows.items() if name.split("/")[0] in systems and key in r
            and (only is None or name.split("/", 1)[1] == only)]
    return max(vals) if vals else None


def goals(result):
    """[(goal, measured or None)] for each of GOALS."""
    secs = result.get("sections", {})
    train = secs.get("train", {}).get("rows", {})
    sample = secs.get("sample", {}).get("rows", {})
    ours, theirs = ("tinyddpm",), ("diffusers", "diffusers-cl")
    ours_t, ref_t = _best(train, ours, "img_s"), _best(train, theirs, "img_s", "bf16-compile")
    ours_s, ref_s = _best(sample, ours, "img_steps_s"), _best(sample, theirs, "img_steps_s")
    reports = secs.get("quality", {}).get("reports", [])
    results = (reports[0].get("summary", {}).get("results") or [{}]) if reports else [{}]
    memo = results[0].get("memorisation") or {}
    flagged = [v["fraction"] for v in memo.values() if isinstance(v, dict) and "fraction" in v]
    measured = (ours_t / ref_t if ours_t and ref_t else None, ours_s / ref_s if ours_s and ref_s else None,
                results[0].get("ratio"), max(flagged) if flagged else None)
    return [(goal, m) for goal, m in zip(GOALS, measured)]


def _table(head, n_names, rows, cells):
    """A Markdown table: `n_names` name columns from each row's key ("system/variant"), then cells(figures)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * n_names + "---:|" * (len(head) - n_names)]
    for name, r in rows.items():
        why = _why(r)
        figures = [why] + [""] * (len(head) - n_names - 1) if why else cells(r)
        lines.append("| " + " | ".join(name.split("/", n_names - 1) + figures) + " |")
    return lines


def _train_table(sec):
    lines = [f"## Training throughput ({sec.get('config')}, batch {sec.get('batch')}, 32 px, synthetic batches)", "",
             "tinyddpm keeps its weights channels_last and takes NCHW batches; diffusers runs as shipped (NCHW) and "
             "converted to channels_last (`diffusers-cl`); ratios are against the faster of the two, and only that "
             "one is compiled.", ""]
    lines += _table(("system", "mode", "img/s", "peak GiB", "TFLOP/s", "MFU", "vs diffusers", "first calls (s)"), 2,
                    sec.get("rows", {}), lambda r: [
                        _num(r.get("img_s")), _num(r.get("peak_mem_gib"), ".2f"), _num(r.get("tflops"), ".1f"),
                        _num(r.get("mfu"), ".1%"), _num(r.get("vs_diffusers"), ".2f", "×"),
                        _num(r.get("first_calls_s"))])
    for name, r in sec.get("systems", {}).items():
        if "params" in r:
            lines.append(f"\n{name}: {r['params']:,} parameters, {r['flops_per_step'] / 1e12:.2f} TFLOP per training "
                         "step (forward + backward)")
    lines += ["", "Real training loop (train.py in-process on the bundled cats; img/s of its progress lines after "
              "the first):", ""]
    for name, r in sec.get("loop", {}).items():
        rates = ", ".join(f"{x:.0f}" for x in r.get("img_s_lines", []))
        lines.append(f"- {name}: " + (_why(r) or f"{_num(r.get('img_s'))} img/s (lines {rates}), "
                                      f"{_num(r.get('wall_s'))} s wall, flags {r.get('flags')}"))
    return lines


def _sample_table(sec):
    lines = [f"## Sampling throughput ({sec.get('config')}, batch {sec.get('batch')}, {sec.get('precision')})", ""]
    lines += _table(("system", "variant", "image-steps/s", "vs diffusers", "peak GiB", "first calls (s)"), 2,
                    sec.get("rows", {}), lambda r: [
                        _num(r.get("img_steps_s"), ".0f"), _num(r.get("vs_diffusers"), ".2f", "×"),
                        _num(r.get("peak_mem_gib"), ".2f"), _num(r.get("first_calls_s"))])
    s = sec.get("sampler", {})
    lines += ["", "Default sampler (DDIM, η = 0, as sample.py): " + (_why(s) or (
        f"{s.get('images')} images × {s.get('steps')} steps in {_num(s.get('wall_s'), '.2f')} s "
        f"({_num(s.get('img_steps_s'), '.0f')} image-steps/s)")) if s else ""]
    return lines


def _agreement(r):
    if "max_feature_diff" not in r:
        return ""
    return (f"max feature diff {r['max_feature_diff']:.1e} (max |feature| {r['max_feature']:.1f}), FID relative "
            f"diff {r['fid_relative_diff']:.1e}; ours {r['tinyddpm_speedup']:.2f}× faster")


def _fid_table(sec):
    lines = [f"## FID throughput ({sec.get('images')}, batch {sec.get('batch')}, median of {sec.get('repeats')})", "",
             "Each extractor's features through the same Fréchet distance (tinyddpm.distance); TF32 convolutions: "
             f"{sec.get('tf32_convolutions')}.", ""]
    lines += _table(("extractor", "img/s", "FID", "agreement with ours"), 1, sec.get("rows", {}),
                    lambda r: [_num(r.get("img_s"), ".0f"), _num(r.get("fid"), ".4f"), _agreement(r)])
    if sec.get("reference_note"):
        lines += ["", sec["reference_note"]]
    return lines


def _quality(sec):
    budget, wall, rate = (_num(sec.get(k), ".0f") for k in ("train_budget_s", "train_wall_s", "img_s"))
    lines = [f"## Quality: `{sec.get('preset')}` preset on the cats, at most {budget} s of training", "",
             f"{sec.get('steps')} steps in {wall} s at {rate} img/s (train.py flags: `{sec.get('train_flags')}`), "
             f"last logged loss {_num(sec.get('last_loss'), '.4f')}",
             ""]
    for rep in sec.get("reports", []):
        lines += [f"sample.py --report {rep.get('flags')}: " + (_why(rep) or ""), "", rep.get("markdown", "")]
    return lines


def markdown(result):
    dev = result.get("device", {})
    smoke = " **Smoke run: CPU, toy sizes and toy data; the figures mean nothing.**" if result.get("smoke") else ""
    peak = result.get("peak_tflops")
    lines = [f"# GPU evidence: {dev.get('name', '?')}", "",
             f"{result.get('started')}; torch {dev.get('torch')}, CUDA {dev.get('cuda')}, diffusers "
             f"{dev.get('diffusers', 'not installed')}" + (f"; {dev['nvidia_smi']}" if dev.get("nvidia_smi") else "")
             + (f"; MFU against {peak:g} TFLOP/s (dense bf16, also for the fp32 rows)." if peak else
                "; no MFU (no peak rate known for this device).") + smoke, "",
             "| section | status | seconds | cap (s) |", "|---|---|---:|---:|"]
    secs = result.get("sections", {})
    for name, sec in secs.items():
        lines.append(f"| {name} | {sec.get('status')}{': ' + sec['error'] if 'error' in sec else ''} "
                     f"| {_num(sec.get('seconds'), '.0f')} | {_num(sec.get('cap_s'), '.0f')} |")
    lines += ["", "## Goals", "", "| goal | target | measured | met |", "|---|---:|---:|---|"]
    for (name, target, cmp, spec, unit), m in goals(result):
        met = "—" if m is None else ("yes" if (m >= target if cmp == ">=" else m <= target) else "no")
        lines.append(f"| {name} | {cmp} {format(target, spec)}{unit} | {_num(m, spec, unit)} | {met} |")
    for name, render in (("train", _train_table), ("sample", _sample_table), ("fid", _fid_table),
                         ("quality", _quality)):
        if name in secs:
            lines += [""] + render(secs[name])
    return "\n".join(lines) + "\n"
