"""Sample images from a trained checkpoint (diffusion or DCGAN).

    python sample.py --ckpt runs/<name>/ckpt.pt --n 64 --out samples/           # 64 PNGs + grid.png
    python sample.py --ckpt ... --sampler ddpm                                     # all T ancestral steps
    python sample.py --ckpt ... --class frog --cfg-scale 3                         # class-conditional + guidance
    python sample.py --ckpt ... --labels "red cube, blue sphere" --cfg-scale 2     # multi-label model
    python sample.py --ckpt ... --bpd --n 256                                      # VLB in bits/dim on the test split
    python sample.py --ckpt ... --report                                           # FID-1k, KID, real-vs-real floor
"""
import argparse
import os
import sys

import numpy as np

from tinyddpm.errors import UserError, run_cli
from tinyddpm.generate import (CLASS_AUTOGUIDANCE, DDIM_SAMPLER, DEFAULT_AUTOGUIDANCE, DEFAULT_BATCH,
                               DEFAULT_DDIM_STEPS, DEFAULT_N, DEFAULT_SAMPLER, DEFAULT_STEPS, SamplingOptions)
from tinyddpm.imageio import GRID_IMAGES
from tinyddpm.report import REPORT_N
from tinyddpm.samplers import SAMPLERS, SPACINGS

DEFAULT_OUT = "samples"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint (runs/<name>/ckpt.pt) or its run folder")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of images (default {DEFAULT_N}; --report: {REPORT_N}; --fuse: 1 per λ)")
    p.add_argument("--out", default=None,
                   help=f"output folder for the PNGs, grid.png and reports (default {DEFAULT_OUT}/, or {DEFAULT_OUT}-2/, "
                        f"{DEFAULT_OUT}-3/, … if it already holds files: a second run never overwrites the first)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help=f"sampler (default {DEFAULT_SAMPLER}; with --eta, --fuse or --interpolate: {DDIM_SAMPLER})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"model calls (default {DEFAULT_STEPS}; --fuse/--interpolate: {DEFAULT_DDIM_STEPS})")
    p.add_argument("--eta", type=float, default=None, help="DDIM η in [0, 1]: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="the solvers' noise levels: uniform in t (default) or karras (docs/samplers.md)")
    p.add_argument("--churn", type=float, default=None, help="heun only: EDM's S_churn (default 0, the plain ODE)")
    p.add_argument("--autoguidance", type=float, default=None,
                   help=f"autoguidance w: the final weights pushed away from the early snapshot train.py keeps; 1 = "
                        f"off (default {DEFAULT_AUTOGUIDANCE} when the checkpoint has a snapshot, "
                        f"{CLASS_AUTOGUIDANCE} for a class-conditional one, else 1; "
                        f"--fuse/--interpolate: 1)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (0 … 2**63 − 1)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per forward pass")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--class", dest="classes", nargs="+", default=None, help="class name(s) for a class model")
    p.add_argument("--labels", default=None, help='label set for a multi-label model, e.g. "red cube, blue sphere"')
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance w: 1 = plain conditional (default), 0 = unconditional, >1 stronger")
    p.add_argument("--bpd", action="store_true", help="report the VLB in bits/dim on --n test images instead")
    # [modes] other modes add their flags here: fusion/interpolation, quality report, conditional evaluation.
    from tinyddpm import cond_eval; cond_eval.add_args(p)
    from tinyddpm import fusion; fusion.add_args(p)
    from tinyddpm import report; report.add_args(p)
    return p


DIFFUSION_ONLY = ("sampler", "steps", "eta", "cfg_scale", "spacing", "churn", "autoguidance")


def pick_mode(args):
    """The one mode asked for: None (plain sampling), --bpd, --eval-labels, --report, --fuse or --interpolate."""
    from tinyddpm import cond_eval, report

    modes = [flag for flag, on in (("--bpd", args.bpd), ("--eval-labels", cond_eval.wanted(args)),
                                   ("--report", report.wanted(args)), ("--fuse", args.fuse),
                                   ("--interpolate", args.interpolate)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are separate modes; run them one at a time")
    return modes[0] if modes else None


def check_args(args, gen):
    """The flags that do not fit this checkpoint or mode. Returns the mode."""
    sampling = [f"--{k.replace('_', '-')}" for k in DIFFUSION_ONLY if getattr(args, k) is not None]
    if gen.kind == "dcgan":
        given = list(sampling)
        if args.bpd:
            given.append("--bpd")
        if args.no_clip:
            given.append("--no-clip")
        if given:
            raise UserError(f"{' '.join(given)} only apply to diffusion models; this checkpoint is a DCGAN")
    if args.cfg_scale is not None and gen.labels["kind"] == "none":
        raise UserError("--cfg-scale needs a conditional model; this one is unconditional")
    mode = pick_mode(args)
    if mode == "--bpd" and sampling:
        raise UserError(f"{' '.join(sampling)} do not apply to --bpd (it scores test images; nothing is sampled)")
    if args.n is not None and mode in ("--interpolate", "--eval-labels"):
        instead = "--frames" if mode == "--interpolate" else "--n-per-set and --n-sets"
        raise UserError(f"--n does not apply to {mode}; use {instead}")
    return mode


def sampling_options(args, gen, mode):
    """The flags resolved once, with each mode's defaults, into one checked SamplingOptions."""
    from tinyddpm import cond_eval

    if mode == "--eval-labels":
        default_n = cond_eval.image_count(args)  # n_per_set × n_sets
    else:  # fusion: --n fusions per λ; interpolation: one strip, its length is --frames
        default_n = {"--report": REPORT_N, "--fuse": 1, "--interpolate": 1}.get(mode, DEFAULT_N)
    default_sampler, default_steps = {
        "--eval-labels": (DEFAULT_SAMPLER, cond_eval.DEFAULT_EVAL_STEPS),
        "--fuse": (DDIM_SAMPLER, DEFAULT_DDIM_STEPS), "--interpolate": (DDIM_SAMPLER, DEFAULT_DDIM_STEPS),
    }.get(mode, (DEFAULT_SAMPLER, DEFAULT_STEPS))
    if args.eta is not None and args.sampler is None:  # η is DDIM's alone: `--eta 1` keeps meaning DDIM, as it did
        default_sampler, default_steps = DDIM_SAMPLER, DEFAULT_DDIM_STEPS
    # Fusion and interpolation keep the plain model by default: their figures and docs are plain DDIM's.
    if args.autoguidance is None:
        autoguidance = 1.0 if mode in ("--fuse", "--interpolate") else gen.default_autoguidance()
    else:
        autoguidance = args.autoguidance
    return SamplingOptions(
        n=default_n if args.n is None else args.n, seed=args.seed, batch_size=args.batch_size,
        sampler=args.sampler or default_sampler, steps=default_steps if args.steps is None else args.steps,
        eta=0.0 if args.eta is None else args.eta, cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale,
        clip_x0=not args.no_clip, spacing=args.spacing or "uniform", churn=0.0 if args.churn is None else args.churn,
        autoguidance=autoguidance,
    ).check(None if gen.diffusion is None else gen.diffusion.num_timesteps, gen)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from tinyddpm import cond_eval, fusion, report
    from tinyddpm.devices import resolve_device
    from tinyddpm.files import check_output_dir, removed_if_unused, unused_folder
    from tinyddpm.generate import LoadedModel

    device = resolve_device(args.device)
    if args.out is None:
        args.out = unused_folder(DEFAULT_OUT)
    check_output_dir(args.out)  # a file in the way is refused before the checkpoint is read
    gen = LoadedModel(args.ckpt, device, use_ema=not args.raw)
    mode = check_args(args, gen)
    opts = sampling_options(args, gen, mode)
    run = {None: sample_images, "--bpd": report_bpd, "--eval-labels": cond_eval.run, "--report": report.run,
           "--fuse": fusion.run, "--interpolate": fusion.run}[mode]
    with removed_if_unused(args.out):  # each mode makes --out (files.prepare_output_dir) before its slow work
        return run(args, gen, opts)


def sample_images(args, gen, opts):
    """The default mode: --n PNGs written batch by batch as they are made (memory flat in --n), and grid.png of
    the first GRID_IMAGES, written as soon as they exist."""
    from tinyddpm.files import prepare_output_dir
    from tinyddpm.generate import Progress
    from tinyddpm.imageio import make_grid, save_png

    cond = gen.parse_condition(args.classes, args.labels)
    out = prepare_output_dir(args.out)
    grid, written = [], 0
    for seeds, images in gen.batches(opts.seeds(), cond, opts.batch_size, Progress(), **opts.sample_kw):
        for s, img in zip(seeds, images):
            save_png(img, os.path.join(out, f"{s:06d}.png"))
        written += len(images)
        if len(grid) < GRID_IMAGES:
            grid.extend(images[: GRID_IMAGES - len(grid)])
            if len(grid) == GRID_IMAGES or written == opts.n:
                save_png(make_grid(np.stack(grid)), os.path.join(out, "grid.png"))
    print(f"wrote {written} images and grid.png to {out}")
    return 0


def report_bpd(args, gen, opts):
    """The full variational bound (T network calls per image) on the first --n images of the test split."""
    import torch

    from tinyddpm import data as data_mod

    images, labels, _ = data_mod.load_dataset(gen.cfg.data, split="test")
    x = data_mod.to_float(images[: opts.n])
    cond = None
    if gen.labels["kind"] != "none" and labels is not None:
        cond = labels[: opts.n]
    g = torch.Generator().manual_seed(opts.seed)
    total = []
    for i in range(0, len(x), opts.batch_size):
        xb = x[i: i + opts.batch_size].to(gen.device)
        c = None if cond is None else cond[i: i + opts.batch_size]
        bpd = gen.diffusion.bits_per_dim(gen.model_fn(c, 1.0), xb, generator=g)
        total.append(bpd.cpu())
        print(f"{i + len(xb)}/{len(x)} images", file=sys.stderr, flush=True)
    bpd = torch.cat(total)
    print(f"bits/dim: {bpd.mean().item():.4f} ± {bpd.std().item() / max(1, len(bpd)) ** 0.5:.4f} "
          f"(VLB on {len(bpd)} test images, step {gen.step})")
    return 0


if __name__ == "__main__":
    from tinyddpm.cpu import configure  # threads follow the free cores (tinyddpm/cpu.py)

    sys.exit(run_cli(main, setup=configure))
