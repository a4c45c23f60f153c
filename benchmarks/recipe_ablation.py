"""The training-recipe ablation of docs/recipe.md: one change per row against a base command, equal training
images per row, each row scored by `sample.py --report` (--base before: with the sampler the first table used,
SDE-DPM-Solver++(2M) at 20 calls, pinned by REPORT_SAMPLING; --base preset: with sample.py's defaults).

    python benchmarks/recipe_ablation.py --out runs/recipe --steps 2500 --jobs 2            # every row, two at a time
    python benchmarks/recipe_ablation.py --out runs/recipe2 --base preset --steps 8000 --rows baseline edm
    python benchmarks/recipe_ablation.py --out /tmp/recipe --smoke                          # toy size, seconds

Each row is a real `train.py` run in --out/runs/<row> (an interrupted ablation resumes: train.py resumes from its
checkpoint, a finished report is kept) and a real `sample.py --report` (FID-1k against the class's 1,000 test
images, with the real-vs-real floor). With --jobs N > 1, N rows run side by side with one thread each
(TINYDDPM_THREADS=1). Results: --out/recipe_ablation.json (every figure, command and setting) and .md (the table).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyddpm.files import atomic_write_bytes  # noqa: E402

# What every row adds its flags to (a later flag wins; --preset tiny is explicit so a GPU machine measures the same):
# before: the tiny preset before the first ablation (no attention, constant learning rate); preset: today's.
MAIN = ["--dataset", "cifar", "--class", "cat", "--preset", "tiny"]
BASES = {"before": MAIN + ["--attn-resolutions", "--lr-decay", "constant"], "preset": MAIN}
# name → (flags added to the --base command, step multiplier at equal training *time*, why it is a candidate)
ROWS = {
    "baseline": ([], 1.0, "the base command unchanged (--base)"),
    "lr-cosine": (["--lr-decay", "cosine"], 1.0, "warm-up then cosine decay to 0 (DDPM replication report)"),
    "min-snr-5": (["--min-snr-gamma", "5"], 1.0, "min-SNR-γ weighting, γ = 5 (Hang et al. 2023)"),
    "v-min-snr-5": (["--objective", "v", "--min-snr-gamma", "5"], 1.0, "v objective with min-SNR-γ (its v form)"),
    "lr-2e-3": (["--lr", "2e-3"], 1.0, "twice the peak learning rate"),
    "ema-0.9995": (["--ema-decay", "0.9995"], 1.0, "a longer EMA"),
    "ema-0.995": (["--ema-decay", "0.995"], 1.0, "a shorter EMA"),
    "schedule-cosine": (["--schedule", "cosine"], 1.0, "cosine noise schedule (Nichol & Dhariwal)"),
    "attn-8": (["--attn-resolutions", "8"], 1.0, "self-attention at 8 px (about 2 % more FLOPs)"),
    "wide-16-8-attn-8": (["--channel-mults", "1", "2", "2", "--attn-resolutions", "8"], 0.63,
                         "twice the channels at 16 and 8 px, attention at 8 px; 1.6× tiny's FLOPs, so 0.63× the "
                         "steps (equal compute)"),
    "batch-64": (["--batch-size", "64"], 0.5, "batch 64 at the same images (half the steps)"),
    "batch-16": (["--batch-size", "16"], 2.0, "batch 16 at the same images (twice the steps)"),
    "no-flip": (["--no-flip"], 1.0, "without horizontal flips"),
    "shift-16": (["--base-channels", "16", "--channel-mults", "1", "4", "4"], 1.0,
                 "half the channels at 32 px (16), twice at 16 px (64), the same at 8 px: about the same FLOPs and "
                 "img/s, the capacity moved to 16 px"),
    "deep-4px": (["--channel-mults", "1", "1", "2", "2"], 1.0, "a fourth level at 4 px (64 ch), attention there"),
    "scale-shift": (["--scale-shift-norm"], 1.0, "FiLM GroupNorm: the embedding scales and shifts (Nichol & Dhariwal)"),
    "dropout-0.1": (["--dropout", "0.1"], 1.0, "dropout 0.1 in the residual blocks (DDPM's CIFAR setting)"),
    "ema-0.9995-now": (["--ema-decay", "0.9995", "--no-ema-warmup"], 1.0,
                       "a longer EMA from step 0 (with the warm-up, 8,000 steps end at about 0.9989 whatever the "
                       "decay)"),
    "edm": (["--objective", "edm", "--train-levels", "lognormal"], 1.0, "EDM's preconditioning and lognormal levels"),
    "edm-precond": (["--objective", "edm"], 1.0, "EDM's preconditioning alone, at uniform whole timesteps"),
    "lognormal": (["--train-levels", "lognormal"], 1.0, "EDM's lognormal training levels alone, ε objective"),
    "guide-16": (["--guide-channels", "16"], 1.0, "a half-width guide network trained alongside until the snapshot"),
    "guide-8": (["--guide-channels", "8"], 1.0, "a quarter-width guide network trained alongside until the snapshot"),
    # Not changes: the base with other training seeds, the yardstick for every other row's difference.
    "seed-1": (["--seed", "1"], 1.0, "the base command with training seed 1 (the spread between seeds)"),
    "seed-2": (["--seed", "2"], 1.0, "the base command with training seed 2 (the spread between seeds)"),
}
POLL_S = 0.5  # seconds between polls of the running rows
SMOKE_FLAGS = ["--dataset", "shapes", "--shapes-count", "64", "--image-size", "16", "--preset", "tiny",
               "--base-channels", "8", "--channel-mults", "1", "--attn-resolutions", "--timesteps", "20",
               "--batch-size", "4",
               "--warmup", "1", "--log-every", "1", "--sample-every", "1000", "--save-every", "1000",
               "--grid-size", "4", "--grid-steps", "2", "--device", "cpu"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs, reports and recipe_ablation.json/.md")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS) + ["combined"],
                   help="rows to run (default all)")
    p.add_argument("--combine", nargs="*", default=[], choices=list(ROWS),
                   help="also run a row 'combined' with the flags of all these rows together")
    p.add_argument("--base", choices=list(BASES), default="before",
                   help="the command every row changes: the tiny preset before the first ablation, or today's")
    p.add_argument("--steps", type=int, default=5000, help="training steps of a row with multiplier 1")
    p.add_argument("--jobs", type=int, default=1, help="rows run side by side, one thread each when > 1")
    p.add_argument("--data-dir", default="data", help="where CIFAR-10 is (downloaded there if missing)")
    p.add_argument("--smoke", action="store_true", help="toy size: 2 steps, 8 images, no FID (seconds)")
    return p


def row_flags(name, args):
    """(train.py flags, steps) of a row."""
    if name == "combined":
        flags = [f for r in args.combine for f in ROWS[r][0]]
        mult = min([ROWS[r][1] for r in args.combine] or [1.0])
    else:
        flags, mult = ROWS[name][0], ROWS[name][1]
    steps = 2 if args.smoke else max(1, round(args.steps * mult))
    base = SMOKE_FLAGS if args.smoke else BASES[args.base] + ["--data-dir", args.data_dir]
    return base + flags + ["--steps", str(steps)], steps


def smoke_reference(args):
    """A stand-in reference for --smoke (shapes has no test split): 16 random 16-px images as a .npy array."""
    import numpy as np

    path = os.path.join(args.out, "smoke_reference.npy")
    if not os.path.exists(path):
        np.save(path, np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    return path


# The sampling of every row's report, per base. 'before': pinned to what docs/recipe.md's first table was measured
# with (sample.py's default when it ran; the default is now 50 calls), so a rerun's figures compare with it.
# 'preset': no flags, so the report is the README's `sample.py --ckpt ... --report` as it is today.
REPORT_SAMPLING = {"before": ["--sampler", "dpmpp-2m-sde", "--steps", "20"], "preset": []}


def commands(name, args):
    run_dir = os.path.join(args.out, "runs", name)
    flags, steps = row_flags(name, args)
    train = [sys.executable, os.path.join(ROOT, "train.py")] + flags + ["--out", run_dir]
    report = [sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", run_dir, "--out",
              os.path.join(args.out, "reports", name)]
    report += ["--report", "--n", "8", "--steps", "2", "--ref", smoke_reference(args)] if args.smoke else \
        ["--report", *REPORT_SAMPLING[args.base]]
    return train, report, run_dir, steps


def start(cmd, log_path, env):
    log = open(log_path, "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log


def train_speed(run_dir):
    """Mean img/s over the run's progress lines (log.jsonl), the first one (start-up) left out."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        speeds = [rec["img_per_s"] for rec in map(json.loads, f) if "img_per_s" in rec][1:]
    return sum(speeds) / len(speeds) if speeds else float("nan")


def run_batch(names, args):
    """Train, then report, the rows `names` side by side; returns {name: result}."""
    env = dict(os.environ)
    if len(names) > 1:
        env["TINYDDPM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    plans = {n: commands(n, args) for n in names}
    results = {}
    for phase in ("train", "report"):
        procs = {}
        for n in names:  # train.py resumes; a finished report is kept, a killed one's files removed
            report = os.path.join(args.out, "reports", n)
            if phase == "report" and os.path.exists(os.path.join(report, "report.json")):
                continue
            shutil.rmtree(report, ignore_errors=True) if phase == "report" else None
            procs[n] = (start(plans[n][phase == "report"], os.path.join(args.out, "logs", f"{n}.{phase}.log"), env),
                        time.perf_counter())
        while procs:  # poll, so each row's wall time ends when *its* process does
            for n, ((proc, log), t0) in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del procs[n]
                results.setdefault(n, {})[f"{phase}_wall_s"] = round(time.perf_counter() - t0, 1)
                if rc != 0:
                    raise SystemExit(f"row {n}: {phase} failed (exit {rc}); see {args.out}/logs/{n}.{phase}.log")
            time.sleep(POLL_S)
    for n in names:
        train, report, run_dir, steps = plans[n]
        with open(os.path.join(args.out, "reports", n, "report.json")) as f:
            rep = json.load(f)
        results[n].update(row=n, steps=steps, threads=1 if len(names) > 1 else "auto", side_by_side=len(names),
                          train_cmd="python train.py " + " ".join(train[2:]),
                          report_cmd="python sample.py " + " ".join(report[2:]),
                          img_per_s=round(train_speed(run_dir), 1), report=rep)
    return results


def table(results):
    lines = ["| row | change | steps | img/s | train min | FID-1k | floor | ratio | precision | recall |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        rep = r["report"]["results"][0]
        fid, floor, ratio = (float("nan") if rep[k] is None else rep[k] for k in ("fid", "floor", "ratio"))
        why = ROWS[r["row"]][2] if r["row"] in ROWS else "the winning rows together"
        lines.append(f"| {r['row']} | {why} | {r['steps']} | {r['img_per_s']} | {r['train_wall_s'] / 60:.1f} | "
                     f"{fid:.2f} | {floor:.2f} | {ratio:.2f} | {rep['precision']:.2f} | {rep['recall']:.2f} |")
        # (--smoke has no floor: its stand-in reference has no real-vs-real split, so floor and ratio show nan)
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    names = list(dict.fromkeys(args.rows + (["combined"] if args.combine else [])))
    path = os.path.join(args.out, "recipe_ablation.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = {k: v for k, v in json.load(f).items() if k not in names}  # rerun rows are measured afresh
    for i in range(0, len(names), args.jobs):
        results.update(run_batch(names[i:i + args.jobs], args))
        atomic_write_bytes(path, json.dumps(results, indent=1).encode())
        atomic_write_bytes(os.path.join(args.out, "recipe_ablation.md"), table(results).encode())
    print(table(results))


if __name__ == "__main__":
    main()
