"""The quality report: how good a checkpoint is, and how far it stands from the best a model could do.

    python sample.py --ckpt runs/<name>/ckpt.pt --report                  # FID-1k and KID vs the test split, floor
    python sample.py --ckpt ... --report --n 1000 --sampler ddpm           # all T ancestral steps
    python sample.py --ckpt ... --report --class cat --cfg-scale 2         # a class model: one row per class
    python sample.py --ckpt ... --report --ref held_out/                   # any other reference (no floor)

For a CIFAR-10 model the reference is the test split of the classes it was trained on (`cifar10:cat:test`: the
1,000 test cats) and the **floor** is the real-vs-real FID: the first N *train* images of the same classes against
the same reference. It is what a model that reproduced its training set would score with N images, so FID/floor
says how far from the best possible the model is. FID-N is biased upwards at small N and differs between N, so a
figure means something only beside its floor, measured with the same N and reference. A class-conditional model
gets one row per class: N images generated for that class against that class's test images, and that class's
floor. The reference and floor images never overlap (test vs train split).

Quality or copying: precision and recall (k = 3) against the reference, beside the floor's, and a memorisation
check against the model's whole train split (the fraction of samples nearer to a training image, in Inception
space and in pixels, than 95 % of the test images are; tinyddpm/neighbours.py).

The Inception features of the reference and the train split are cached (--cache-dir, default
~/.cache/tinyddpm/fid), keyed by the images and the weights, so a second report measures only the generated images.
The floor is the first N images of that train split, so it costs nothing extra.

Writes into --out: report.json (every figure and setting), report.md (a Markdown table, one row per class), the
generated images as report_images[_<class>].npy (uint8 [N, S, S, 3]: `python fid.py report_images.npy
cifar10:cat:test` gives the same FID), report_grid[_<class>].png (the first GRID_IMAGES of them) and
report_nearest[_<class>].png (the samples nearest to the training set, each beside its nearest training image).
"""
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .constants import GRID_IMAGES
from .data import CIFAR10_CLASSES
from .errors import UserError
from .files import atomic_write_bytes, prepare_output_dir
from .imageio import make_grid, save_png
from .sources import CifarReference, is_cifar_reference, parse_cifar_reference

REPORT_N = 1000  # images per report when --n is not given: the FID-1k protocol of the reports this grew from
KID_SCALE = 1e3  # KID is printed ×1000, as in the KID paper's tables
FEATURES = 2048  # Inception pool features: with this many images or fewer the covariances are singular


@dataclass(frozen=True)
class ReportOptions:
    """What to measure against (sample.py --report's own flags)."""
    ref: Optional[str] = None  # a dataset reference, folder, .npz or .npy (default: the test split of the classes)
    data_dir: Optional[str] = None  # where CIFAR-10 is read (default: the checkpoint's --data-dir)
    inception_weights: Optional[str] = None
    cache_dir: Optional[str] = None  # reference features (default ~/.cache/tinyddpm/fid)
    skip_bad: bool = False  # skip unreadable images of a --ref folder
    train_images: Optional[int] = None  # memorisation: search the first M train images (None: all; 0: no check)
    classes: tuple = ()  # a class model's classes to report (default: all it knows)


# ------------------------------------------------------------------------------------------------ what to measure
@dataclass
class Row:
    """One line of the report: N images generated with `cond` (class index or None) against `ref`."""
    label: str  # the class name, or "all" for an unconditional model
    cond_index: Optional[int]
    ref: str  # what fid.py would be given: a dataset reference or a path
    floor: Optional[CifarReference]  # N train images of the same classes; None when the reference is not a dataset
    train: Optional[CifarReference] = None  # train images searched for copies (floor ⊂ train); None: no such check


def _model_classes(loaded):
    """CIFAR-10 indices the checkpoint was trained on, or None when it was not trained on CIFAR-10."""
    data = loaded.cfg.data
    if data.dataset != "cifar":
        return None
    return tuple(parse_cifar_reference(f"cifar10:{','.join(map(str, data.classes)) or 'all'}:test").classes)


def _dataset_row(label, cond_index, classes, n, train_images, ref=None):
    """A row against CIFAR-10 (ref: the test split of `classes` unless given), its floor and its training set."""
    ref, split = ref or CifarReference(tuple(classes), "test"), CifarReference(tuple(classes), "train")
    train = split if train_images is None else split.with_count(max(train_images, n)) if train_images else None
    return Row(label, cond_index, ref.spec, split.with_count(n), train)


def plan(loaded, request, n):
    """The report's rows for ReportOptions `request`, with every way it can be wrong caught before anything slow."""
    if n < 2:
        raise UserError(f"--n must be at least 2 for a report (a covariance needs two images; got {n})")
    if request.train_images is not None and request.train_images < 0:
        raise UserError(f"--train-images must be 0 (no memorisation check) or more (got {request.train_images})")
    kind, model_classes = loaded.labels["kind"], _model_classes(loaded)
    if kind == "multilabel":
        raise UserError("the quality report is for CIFAR-10 and image-folder models; score a shapes model with "
                        "--eval-labels --evaluator runs/evaluator.pt (docs/conditional.md)")
    if kind == "none" and request.classes:
        raise UserError("this model is unconditional; drop --class (the report uses the classes it was trained on)")
    names, ref_spec, train_images = loaded.labels["names"], request.ref, request.train_images
    if kind == "class":
        asked = list(dict.fromkeys(names[loaded.class_index(c)] for c in (request.classes or names)))
    if ref_spec is None:
        if model_classes is None:
            raise UserError(f"this model was trained on --dataset {loaded.cfg.data.dataset}, which has no built-in "
                            "reference split; pass --ref with a folder of held-out images or a .npz statistics file")
        if kind == "class":  # one row per class, each against that class's test images
            return [_dataset_row(c, names.index(c), [CIFAR10_CLASSES.index(c)], n, train_images) for c in asked]
        return [_dataset_row("all" if len(model_classes) == len(CIFAR10_CLASSES) else
                             ",".join(CIFAR10_CLASSES[i] for i in model_classes), None, model_classes, n,
                             train_images)]
    if kind == "class" and len(asked) != 1:
        raise UserError("--ref names one reference, so a report on a class model with --ref needs one --class")
    label, cond_index = (asked[0], names.index(asked[0])) if kind == "class" else ("all", None)
    if not is_cifar_reference(ref_spec) or os.path.exists(ref_spec):
        return [Row(label, cond_index, ref_spec, None)]  # a folder or a file: no train split to take a floor from
    ref = parse_cifar_reference(ref_spec)
    trained = model_classes if kind != "class" else (CIFAR10_CLASSES.index(asked[0]),)
    if trained is None:
        raise UserError(f"this model was trained on --dataset {loaded.cfg.data.dataset}, not CIFAR-10, so {ref_spec} "
                        f"is not its reference; pass --ref with held-out images of its own data")
    if sorted(ref.classes) != sorted(trained):
        want = CifarReference(tuple(trained), "test").spec
        raise UserError(f"{ref_spec} holds other classes than the model makes "
                        f"({','.join(CIFAR10_CLASSES[i] for i in trained)}); pass --ref {want}")
    if ref.split != "test":
        raise UserError(f"{ref_spec} is the train split, which the model was trained on and the floor is taken "
                        f"from; use the test split, e.g. --ref {ref.with_count(None).spec.replace(':train', ':test')}")
    return [_dataset_row(label, cond_index, ref.classes, n, train_images, ref)]


# ------------------------------------------------------------------------------------------------ the work
def fid(a, b):
    """FID between two statistics.Measurements (the small-N warning is said once, in the report's own words)."""
    from .distance import frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def kid(a, b, seed=0):
    """(mean, std) over subsets, or None when a side has no features (a .npz statistics file)."""
    from .distance import kernel_inception_distance

    if a.features is None or b.features is None:
        return None
    return kernel_inception_distance(a.features, b.features, seed=seed)


def measure_reference(source, model, cache_dir, batch_size, device, skip_bad=False):
    """A reference, floor or training Source → Measurement with features (none for a .npz statistics file),
    cached in cache_dir."""
    from .statistics import measure

    return measure(source, model, batch_size, device, skip_bad=skip_bad, keep_features=True, cache_dir=cache_dir)


def precision_recall(real, fake):
    """neighbours.precision_recall of two Measurements' features, (None, None) where a side has none."""
    from .neighbours import precision_recall as pr

    if real is None or fake is None or real.features is None or fake.features is None:
        return None, None
    return pr(real.features, fake.features)


def memorisation(images, fake, row, ref, train, sources, grid_path):
    """The memorisation check of a row (None without a training set): nearest train image of each generated one
    in Inception space and in pixels, the fraction flagged, and a grid of the closest pairs."""
    from .neighbours import GRID_PAIRS, MEMORISATION_PERCENTILE, closest_pairs, memorisation as check

    if train is None or ref.features is None:
        return None
    test_px, train_px = sources[row.ref].array, sources[row.train.spec].array
    found = {"inception": check(fake.features, ref.features, train.features)}
    if test_px is not None and test_px.shape[1:] == images.shape[1:] == train_px.shape[1:]:
        found["pixels"] = check(images, test_px, train_px)
    save_png(make_grid(closest_pairs(images, train_px, list(found.values())), ncol=2 * len(found)), grid_path)
    return dict(train_reference=row.train.spec, train_images=train.n, percentile=MEMORISATION_PERCENTILE,
                grid=os.path.basename(grid_path), grid_pairs=GRID_PAIRS, **{k: v.summary() for k, v in found.items()})


def _settings(options, loaded):
    """How the images were drawn, as the report records it."""
    if loaded.kind != "ddpm":
        return dict(sampler=None, steps=None, eta=None, cfg_scale=None)
    sampler = options.sampler
    return dict(sampler=sampler.name,
                steps=loaded.diffusion.num_timesteps if sampler.name == "ddpm" else sampler.calls(),
                eta=sampler.eta, cfg_scale=None if loaded.labels["kind"] == "none" else options.guidance_scale,
                spacing=sampler.spacing, churn=sampler.churn, autoguidance=options.autoguidance,
                guide_step=loaded.guide_step if options.autoguidance != 1.0 else None,
                # a string, since HI may be inf and strict JSON has no infinity
                guidance_interval=None if options.guidance_interval is None
                else "({:g}, {:g}]".format(*options.guidance_interval))


def _read_references(rows, data_dir, n):
    """Every reference, floor and training set of the rows, read (and checked) before anything slow starts:
    {spec: Source}. The floor is the first n images of the training set when there is one, so it is not read twice."""
    from .sources import resolve_source

    wanted = [row.ref for row in rows] + [(row.train or row.floor).spec for row in rows if row.floor is not None]
    sources = {spec: resolve_source(spec, data_dir) for spec in dict.fromkeys(wanted)}
    for spec in wanted[len(rows):]:
        if len(sources[spec]) < n:
            raise UserError(f"{spec} holds {len(sources[spec])} images, fewer than --n {n}; use --n "
                            f"{len(sources[spec])} or less")
    for row in rows:
        source = sources[row.ref]
        if source.kind != "stats" and n > len(source):
            raise UserError(f"--n {n} is more than the {len(source)} images of the reference {row.ref}; use "
                            f"--n {len(source)} or less (the floor must compare as many real images)")
    return sources


def run_report(loaded, request, options, out, log=None):
    """Generate options.n images per row (plan), measure them and their floors, and write report.json, report.md
    and the images into the folder `out`, created here (after every check). Returns the summary (as report.json).
    log(message): progress lines."""
    from .inception import load_inception
    from .statistics import Measurement, check_dimensions, default_cache_dir, feature_batch, features_from_uint8

    say = log or (lambda message: None)
    t_start, n = time.perf_counter(), options.n
    rows = plan(loaded, request, n)
    sources = _read_references(rows, request.data_dir or loaded.cfg.data.data_dir, n)
    prepare_output_dir(out)
    model = load_inception(request.inception_weights, loaded.device)
    check_dimensions([sources[row.ref] for row in rows], model, loaded.device)
    feat_batch = feature_batch(options.batch_size, loaded.device)  # options.batch_size is the sampling batch
    cache_dir = request.cache_dir or default_cache_dir()
    real = {spec: measure_reference(source, model, cache_dir, feat_batch, loaded.device, request.skip_bad)
            for spec, source in sources.items()}
    results = []
    for row in rows:
        t_row = time.perf_counter()
        ref, train = real[row.ref], None if row.train is None else real[row.train.spec]
        floor = train.head(n) if train is not None else None if row.floor is None else real[row.floor.spec]

        def progress(done, total):
            dt = time.perf_counter() - t_gen
            say(f"{row.label}: generated {done}/{total} | {done / dt:.2f} img/s | ETA {(total - done) * dt / done:.0f}s")

        t_gen = time.perf_counter()
        cond = None if row.cond_index is None else torch.full((n,), row.cond_index, dtype=torch.long)
        images = loaded.images(cond, options, progress)
        gen_seconds = time.perf_counter() - t_gen
        fake = Measurement.from_features(features_from_uint8(images, model, feat_batch, loaded.device,
                                                             progress=True))
        suffix = "" if len(rows) == 1 else f"_{row.label}"
        _save_array(images, os.path.join(out, f"report_images{suffix}.npy"))
        save_png(make_grid(images[:GRID_IMAGES]), os.path.join(out, f"report_grid{suffix}.png"))
        fid_, floor_fid = fid(fake, ref), None if floor is None else fid(floor, ref)
        (precision, recall), floor_pr = precision_recall(ref, fake), precision_recall(ref, floor)
        results.append(dict(
            condition=row.label if row.cond_index is not None else None, reference=row.ref,
            reference_images=ref.n, floor_reference=None if row.floor is None else row.floor.spec,
            fid=fid_, floor=floor_fid, ratio=None if floor_fid is None else fid_ / floor_fid,
            kid=kid(fake, ref, options.seed), floor_kid=None if floor is None else kid(floor, ref, options.seed),
            precision=precision, recall=recall, floor_precision=floor_pr[0], floor_recall=floor_pr[1],
            memorisation=memorisation(images, fake, row, ref, train, sources,
                                      os.path.join(out, f"report_nearest{suffix}.png")),
            generate_seconds=gen_seconds,
            seconds=time.perf_counter() - t_row))
    summary = dict(ckpt=os.fspath(loaded.path), model=loaded.kind, step=loaded.step, n=n, seed=options.seed,
                   **_settings(options, loaded), ema=loaded.use_ema, posthoc_ema=loaded.posthoc_ema, device=str(loaded.device),
                   inception=model.weights_id, results=results, wall_seconds=time.perf_counter() - t_start)
    atomic_write_bytes(os.path.join(out, "report.json"), (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(os.path.join(out, "report.md"), printable(markdown(summary)).encode())
    return summary


def printable(text):
    """A path that is not UTF-8 (undecodable bytes arrive as surrogates) is shown with \\x escapes, not a crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _save_array(images, path):
    import io

    buf = io.BytesIO()
    np.save(buf, images)
    atomic_write_bytes(path, buf.getvalue())


def _fmt(x, scale=1.0, digits=2, unit=""):
    return "—" if x is None else f"{x * scale:.{digits}f}{unit}"


def _kid(pair):
    """'24.12' when the KID was computed once over the whole sets (both sides the same N ≤ the subset size: no
    spread to give), else '24.12 ± 1.30' (mean ± std over the subsets), ×1e3."""
    if pair is None:
        return "—"
    mean, std = pair
    return _fmt(mean, KID_SCALE) + ("" if std == 0 else f" ± {_fmt(std, KID_SCALE)}")


def _memorised(m):
    """'1.2 % / 0.8 %': the fractions flagged in Inception space / in pixels."""
    if m is None:
        return "—"
    return " / ".join(_fmt(m[space]["fraction"], 100, 1, " %") for space in ("inception", "pixels") if space in m)


def markdown(summary):
    """The report as a Markdown table: one row per class (or one for an unconditional model)."""
    how = summary["model"] if summary["sampler"] is None else (
        f"{summary['sampler']} {summary['steps']}"
        + (f", η = {summary['eta']:g}" if summary["sampler"] == "ddim" and summary["eta"] else "")
        + (f", {summary['spacing']} spacing" if summary.get("spacing") not in (None, "uniform") else "")
        + (f", churn {summary['churn']:g}" if summary.get("churn") else "")
        + (f", post-hoc EMA σ_rel {summary['posthoc_ema']:g}" if summary.get("posthoc_ema") is not None
           else "" if summary.get("ema", True) else ", raw weights")
        + (f", autoguidance {summary['autoguidance']:g} (step {summary['guide_step']})"
           if summary.get("autoguidance", 1.0) != 1.0 else "")
        + ("" if summary["cfg_scale"] is None else f", w = {summary['cfg_scale']:g}")
        + ("" if summary.get("guidance_interval") is None else f", guided at σ in {summary['guidance_interval']}"))
    lines = ["| checkpoint | step | sampling | condition | N | reference | FID | floor | FID / floor "
             "| KID ×1e3 | floor KID ×1e3 | precision (floor) | recall (floor) | memorised: Inception / pixels "
             "| seconds |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["results"]:
        kid = _kid(r["kid"])
        fkid = "—" if r["floor_kid"] is None else f"{r['floor_kid'][0] * KID_SCALE:.2f}"
        pr = [f"{_fmt(r[k])} ({_fmt(r['floor_' + k])})" for k in ("precision", "recall")]
        lines.append(f"| {summary['ckpt']} | {summary['step']} | {how} | {r['condition'] or '—'} | {summary['n']} | "
                     f"{r['reference']} | {_fmt(r['fid'])} | {_fmt(r['floor'])} | {_fmt(r['ratio'], unit='×')} | "
                     f"{kid} | {fkid} | {pr[0]} | {pr[1]} | {_memorised(r['memorisation'])} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
