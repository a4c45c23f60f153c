"""Scoring a conditional shapes model: generate the held-out label sets, let the evaluator name what it sees.

    python sample.py --ckpt runs/<shapes run>/ckpt.pt --eval-labels --evaluator runs/evaluator.pt --cfg-scale 2
    python sample.py --ckpt ... --eval-labels --evaluator runs/evaluator.pt --cfg-sweep 0 1 3   # a guidance table

The label sets are `shapes.eval_label_sets()`: 256 combinations of 2–3 objects that never appear together in
training, always in the same order, so a figure means the same thing for every model. Image j shows set
j // n_per_set and uses seed `--seed + j`, so every guidance scale w starts from the same noise and a sweep
compares like with like. The accuracy is i-CLEVR's (`evaluator.iclevr_accuracy`): for an image of k objects,
the share of the evaluator's k top labels that were asked for, over all objects of all images.

Chance level: if the evaluator ranked the 24 labels at random, independently of the image, an image of k objects
would score k/24 on average, so chance is Σk² / (24·Σk) over the list (12.1 % for the full list: 223 sets of 3
objects, 33 of 2). w = 0 (the unconditional model, same seeds) is the measured version of that baseline.

The evaluator must have been trained at the model's image size: we refuse rather than resize, because resizing
changes what the evaluator sees and so the figure. Writes <--out>/eval_grid_w<w>.png (the first GRID_IMAGES
images; cell j shows set j // n_per_set), eval_labels.txt (the sets in list order, one per line) and eval.json.
"""
import json
import math
import os
import time
from dataclasses import replace

import numpy as np
import torch

from . import evaluator as ev
from . import shapes
from .constants import GRID_IMAGES
from .errors import UserError
from .files import atomic_write_bytes
from .imageio import make_grid, save_png

MAX_PER_SET = 100  # images per label set: all N = 256 × this are held in memory for the evaluator
EXAMPLE_EVALUATOR = "runs/evaluator.pt"


def chance_accuracy(label_sets):
    """Expected accuracy of a ranking that ignores the image: Σk² / (NUM_LABELS·Σk) over the sets."""
    k = np.array([len(s) for s in label_sets], dtype=np.float64)
    return float((k * k).sum() / (shapes.NUM_LABELS * k.sum()))


# ------------------------------------------------------------------------------------------------ checks
def label_sets(n_sets=None):
    """The first n_sets (default all) of the fixed held-out label sets."""
    if n_sets is not None and not 1 <= n_sets <= shapes.EVAL_COUNT:
        raise UserError(f"--n-sets must be between 1 and {shapes.EVAL_COUNT} (got {n_sets})")
    return shapes.eval_label_sets()[:n_sets]


def check_model(loaded, scales):
    """A shapes model (multi-label) and finite, non-negative guidance scales, before anything slow happens."""
    kind = loaded.labels["kind"]
    if kind != "multilabel":
        what = "unconditional" if kind == "none" else "conditioned on classes"
        raise UserError(f"--eval-labels scores a shapes model (trained with --dataset shapes --conditional); "
                        f"this checkpoint is {what}")
    if not all(math.isfinite(w) and w >= 0 for w in scales):
        raise UserError(f"guidance scales must be finite and ≥ 0 (got {list(scales)}); 0 is unconditional, "
                        "1 plain conditional")


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


def generate(loaded, cond, w, options, callback=None):
    """uint8 [N, S, S, 3] for multi-hot `cond` [N, 24] at guidance scale w."""
    # w = 0 is the unconditional model: out_u + 0·(out_c − out_u) = out_u. Passing no condition gives the same
    # null-condition prediction with one forward pass instead of two.
    c = None if w == 0 and loaded.kind == "ddpm" else torch.from_numpy(cond)
    return loaded.images(c, replace(options, guidance_scale=w), callback)


def evaluate(loaded, evaluator, sets, n_per_set, scales, options, progress=None):
    """Yield one result per guidance scale w as it is measured: {cfg_scale, accuracy, images, seconds, grid}: the
    accuracy of the evaluator on n_per_set images of each label set (options.n of them; image j shows set
    j // n_per_set), and a grid of the first GRID_IMAGES images (uint8). progress(w) → a callback(done, total)."""
    cond = conditions(sets, n_per_set)  # [options.n, 24]
    for w in scales:
        t0 = time.perf_counter()
        images = generate(loaded, cond, w, options, progress(w) if progress else None)
        accuracy = ev.evaluate_images(evaluator, images, cond)
        yield dict(cfg_scale=w, accuracy=accuracy, images=len(images), seconds=time.perf_counter() - t0,
                   grid=make_grid(images[:GRID_IMAGES]))


def write_results(out, summary, sets, grids):
    """eval.json (the summary), eval_labels.txt (the sets in list order) and eval_grid_w<w>.png per scale."""
    for w, grid in grids.items():
        save_png(grid, os.path.join(out, f"eval_grid_w{w:g}.png"))
    atomic_write_bytes(os.path.join(out, "eval.json"), (json.dumps(summary, indent=2) + "\n").encode())
    text = "".join(", ".join(f"{c} {s}" for c, s in objs) + "\n" for objs in sets)
    atomic_write_bytes(os.path.join(out, "eval_labels.txt"), text.encode())
