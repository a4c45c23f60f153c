"""Scoring a conditional shapes model: generate the held-out label sets, let the evaluator name what it sees.

    python sample.py --ckpt runs/<shapes run>/ckpt.pt --eval-labels --evaluator runs/evaluator.pt --cfg-scale 2
    python sample.py --ckpt ... --eval-labels --evaluator runs/evaluator.pt --cfg-sweep 0 1 3   # a guidance table

The label sets are `shapes.eval_label_sets()`: 256 combinations of 2–3 objects that never appear together in
training, always in the same order, so a figure means the same thing for every model. Image j shows set
j // n_per_set and uses seed `--seed + j`, so every guidance scale w starts from the same noise and a sweep
compares like with like. The accuracy is i-CLEVR's (`evaluator.iclevr_accuracy`): for an image of k objects,
the share of the evaluator's k top labels that were asked for, over all objects of all images.

Chance level: if the evaluator ranked the 24 labels at random, independently of the image, an image of k objects
would score k/24 on average, so chance is Σk² / (24·Σk) over the list (12.1 % for the full list: 223 sets of 3 objects, 33 of 2). w = 0 (the
unconditional model, same seeds) is the measured version of that baseline.

The evaluator must have been trained at the model's image size: we refuse rather than resize, because resizing
changes what the evaluator sees and so the figure. Writes <--out>/eval_grid_w<w>.png (the first GRID_IMAGES
images; cell j shows set j // n_per_set), eval_labels.txt (the sets in list order, one per line) and eval.json.
"""
import json
import math
import os
import time

import numpy as np
import torch

from . import evaluator as ev
from . import shapes
from .errors import UserError
from .files import atomic_write_bytes, prepare_output_dir
from .generate import Progress
from .imageio import GRID_IMAGES, make_grid, save_png

DEFAULT_EVAL_STEPS = 50  # sampler steps when --steps is not given: the figure moves little beyond this
MAX_PER_SET = 100  # images per label set: all N = 256 × this are held in memory for the evaluator
EXAMPLE_EVALUATOR = "runs/evaluator.pt"


def add_args(p):
    """sample.py's flags for this mode."""
    g = p.add_argument_group("conditional evaluation (shapes models)")
    g.add_argument("--eval-labels", action="store_true",
                   help="generate the fixed held-out label sets and print the evaluator's accuracy")
    g.add_argument("--evaluator", default=None,
                   help=f"shapes evaluator checkpoint ({EXAMPLE_EVALUATOR}; train: python -m tinyddpm.evaluator)")
    g.add_argument("--n-per-set", type=int, default=1, help="images per held-out label set (default 1)")
    g.add_argument("--n-sets", type=int, default=None,
                   help=f"use only the first N label sets of the list (default all {shapes.EVAL_COUNT})")
    g.add_argument("--cfg-sweep", type=float, nargs="+", default=None, metavar="W",
                   help="several guidance scales, e.g. --cfg-sweep 0 1 3: one accuracy table")


def wanted(args):
    """True when any flag of this mode was given (so a stray --evaluator is an error, not silently ignored)."""
    return bool(args.eval_labels or args.evaluator or args.cfg_sweep or args.n_sets is not None
                or args.n_per_set != 1)


def chance_accuracy(label_sets):
    """Expected accuracy of a ranking that ignores the image: Σk² / (NUM_LABELS·Σk) over the sets."""
    k = np.array([len(s) for s in label_sets], dtype=np.float64)
    return float((k * k).sum() / (shapes.NUM_LABELS * k.sum()))


# ------------------------------------------------------------------------------------------------ checks
def image_count(args):
    """How many images the run makes, n_per_set × n_sets, with this mode's own count flags checked first (sample.py
    asks for it while it resolves the sampling options, before anything slow)."""
    if not args.eval_labels:
        raise UserError("--evaluator, --n-per-set, --n-sets and --cfg-sweep only apply with --eval-labels")
    if not 1 <= args.n_per_set <= MAX_PER_SET:
        raise UserError(f"--n-per-set must be between 1 and {MAX_PER_SET} (got {args.n_per_set})")
    if args.n_sets is not None and not 1 <= args.n_sets <= shapes.EVAL_COUNT:
        raise UserError(f"--n-sets must be between 1 and {shapes.EVAL_COUNT} (got {args.n_sets})")
    return args.n_per_set * (args.n_sets or shapes.EVAL_COUNT)


def check(args, gen, opts):
    """Every way the request can be wrong, before anything slow happens. Returns (scales, sets)."""
    kind = gen.labels["kind"]
    if kind != "multilabel":
        what = "unconditional" if kind == "none" else "conditioned on classes"
        raise UserError(f"--eval-labels scores a shapes model (trained with --dataset shapes --conditional); "
                        f"this checkpoint is {what}")
    if args.classes or args.labels:
        raise UserError("--eval-labels uses the fixed held-out label sets; drop --class/--labels")
    if args.cfg_sweep is not None and args.cfg_scale is not None:
        raise UserError("give either --cfg-scale W or --cfg-sweep W1 W2 …, not both")
    scales = args.cfg_sweep or [opts.cfg_scale]  # --cfg-scale was checked with the other sampling options
    if not all(math.isfinite(w) and w >= 0 for w in scales):
        raise UserError(f"guidance scales must be finite and ≥ 0 (got {scales}); 0 is unconditional, "
                        "1 plain conditional")
    if gen.kind != "ddpm" and args.cfg_sweep is not None:
        raise UserError("--cfg-sweep only applies to diffusion models; this checkpoint is a DCGAN")
    sets = shapes.eval_label_sets()[: args.n_sets]
    return scales, sets


def load_matching_evaluator(path, image_size, device):
    """The evaluator at `path`, refused (with how to train the right one) if missing or of another image size."""
    train_cmd = f"python -m tinyddpm.evaluator --out {path or EXAMPLE_EVALUATOR} --size {image_size}"
    if image_size not in shapes.SIZES:
        raise UserError(f"the shapes evaluator scores {' or '.join(map(str, shapes.SIZES))} px images, but this "
                        f"model makes {image_size} px ones; train the model at one of those sizes")
    if not path:
        raise UserError(f"--eval-labels needs --evaluator; train one (minutes on a CPU) with `{train_cmd}`")
    if not os.path.isfile(path):
        raise UserError(f"evaluator {path} does not exist; train it (minutes on a CPU) with `{train_cmd}`")
    evaluator = ev.load_evaluator(path)
    size = evaluator.config["size"]
    if size != image_size:
        raise UserError(f"evaluator {path} was trained on {size} px images but this model makes {image_size} px "
                        f"ones (resizing would change the figure); train a matching one with `{train_cmd}`")
    return evaluator.to(device)


# ------------------------------------------------------------------------------------------------ the work
def conditions(sets, n_per_set):
    """Multi-hot float32 [len(sets)·n_per_set, 24]: row j is set j // n_per_set."""
    rows = np.stack([shapes.objects_to_multi_hot(s) for s in sets])
    return np.repeat(rows, n_per_set, axis=0)


def generate(gen, cond, w, opts, progress=None):
    """uint8 [N, S, S, 3] for multi-hot `cond` [N, 24] at guidance scale w."""
    # w = 0 is the unconditional model: out_u + 0·(out_c − out_u) = out_u. Passing no condition gives the same
    # null-condition prediction with one forward pass instead of two.
    c = None if w == 0 and gen.kind == "ddpm" else torch.from_numpy(cond)
    kw = dict(opts.sample_kw, cfg_scale=w)
    return gen.images(opts.seeds(), c, opts.batch_size, progress, **kw)


def run(args, gen, opts):
    """sample.py --eval-labels: generate, score, print one line per scale (a table for a sweep), write grids."""
    scales, sets = check(args, gen, opts)
    evaluator = load_matching_evaluator(args.evaluator, gen.image_size, gen.device)
    cond = conditions(sets, args.n_per_set)  # [opts.n, 24]
    out = prepare_output_dir(args.out)
    how = "" if gen.kind != "ddpm" else f", {opts.sampler}" + ("" if opts.sampler == "ddpm" else f" {opts.steps} steps")
    results = []
    for w in scales:
        t0 = time.perf_counter()
        images = generate(gen, cond, w, opts, Progress(f"w = {w:g}: "))
        accuracy = ev.evaluate_images(evaluator, images, cond)
        seconds = time.perf_counter() - t0
        save_png(make_grid(images[:GRID_IMAGES]), os.path.join(out, f"eval_grid_w{w:g}.png"))
        results.append(dict(cfg_scale=w, accuracy=accuracy, images=len(images), seconds=seconds))
        print(f"accuracy: {100 * accuracy:.1f}% on {len(images)} images of the held-out label sets "
              f"(w = {w:g}{how}, {seconds:.0f}s)", flush=True)
    chance = chance_accuracy(sets)
    if len(results) > 1:
        print("\n|   w | accuracy | images | seconds |\n|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['cfg_scale']:g} | {100 * r['accuracy']:.1f}% | {r['images']} | {r['seconds']:.0f} |")
    print(f"chance (labels ranked independently of the image): {100 * chance:.1f}%")
    summary = dict(ckpt=os.fspath(args.ckpt), step=gen.step, evaluator=os.fspath(args.evaluator),
                   label_sets=len(sets), n_per_set=args.n_per_set, seed=opts.seed, chance=chance, results=results)
    atomic_write_bytes(os.path.join(out, "eval.json"), (json.dumps(summary, indent=2) + "\n").encode())
    text = "".join(", ".join(f"{c} {s}" for c, s in objs) + "\n" for objs in sets)
    atomic_write_bytes(os.path.join(out, "eval_labels.txt"), text.encode())
    print(f"wrote eval.json, eval_labels.txt and {len(results)} grid(s) to {out}")
    return 0
