"""sample.py's plain mode (PNGs and a grid) and --bpd (the variational bound on test images)."""
import os

import numpy as np
import torch

from .. import data as data_mod
from ..constants import GRID_IMAGES
from ..files import prepare_output_dir
from ..imageio import make_grid, save_png
from .common import Progress, sampling_options, say


def condition(args, loaded):
    """--class / --labels as rows that images cycle through; a class model without --class cycles all classes."""
    if loaded.labels["kind"] == "class" and not args.classes:
        say(f"no --class given: cycling through all classes ({', '.join(loaded.labels['names'])})")
    return loaded.condition(args.classes, args.labels)


def run(args, loaded):
    """--n PNGs written batch by batch as they are made (memory flat in --n), and grid.png of the first
    GRID_IMAGES, written as soon as they exist."""
    options = sampling_options(args, loaded)
    cond = condition(args, loaded)
    out = prepare_output_dir(args.out)
    grid, written = [], 0
    for seeds, images in loaded.batches(cond, options, Progress()):
        for s, img in zip(seeds, images):
            save_png(img, os.path.join(out, f"{s:06d}.png"))
        written += len(images)
        if len(grid) < GRID_IMAGES:
            grid.extend(images[: GRID_IMAGES - len(grid)])
            if len(grid) == GRID_IMAGES or written == options.n:
                save_png(make_grid(np.stack(grid)), os.path.join(out, "grid.png"))
    print(f"wrote {written} images and grid.png to {out}")
    return 0


def run_bpd(args, loaded):
    """The full variational bound (T network calls per image) on the first --n images of the test split."""
    options = sampling_options(args, loaded, autoguidance=1.0)
    images, labels, _ = data_mod.load_dataset(loaded.cfg.data, split="test")
    x = data_mod.to_float(images[: options.n])
    cond = labels[: options.n] if loaded.labels["kind"] != "none" and labels is not None else None
    g = torch.Generator().manual_seed(options.seed)
    total = []
    for i in range(0, len(x), options.batch_size):
        xb = x[i: i + options.batch_size].to(loaded.device)
        c = None if cond is None else cond[i: i + options.batch_size]
        total.append(loaded.diffusion.bits_per_dim(loaded.network_fn(c), xb, generator=g).cpu())
        say(f"{i + len(xb)}/{len(x)} images")
    bpd = torch.cat(total)
    spread = f" ± {bpd.std().item() / len(bpd) ** 0.5:.4f}" if len(bpd) > 1 else ""  # no spread from one image
    print(f"bits/dim: {bpd.mean().item():.4f}{spread} (VLB on {len(bpd)} test image{'s' * (len(bpd) > 1)}, "
          f"step {loaded.step})")
    return 0
