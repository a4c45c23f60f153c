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
import time

from tinyddpm.errors import UserError, run_cli
from tinyddpm.generate import DEFAULT_DDIM_STEPS, DefaultN
from tinyddpm.report import REPORT_N

DEFAULT_N = 64


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint (runs/<name>/ckpt.pt) or its run folder")
    p.add_argument("--n", type=int, default=DefaultN(DEFAULT_N),
                   help=f"number of images (default {DEFAULT_N}; --report: {REPORT_N}; --fuse: 1 per λ)")
    p.add_argument("--out", default="samples", help="output folder for the PNGs and grid.png")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                   help="ddim (default, --steps steps) or ddpm (all T ancestral steps)")
    p.add_argument("--steps", type=int, default=None, help=f"DDIM steps (default {DEFAULT_DDIM_STEPS})")
    p.add_argument("--eta", type=float, default=None, help="DDIM η: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
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


DIFFUSION_ONLY = ("sampler", "steps", "eta", "cfg_scale")


def check_args(args, gen):
    if args.n < 1:
        raise UserError(f"--n must be at least 1 (got {args.n})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {args.steps})")
    if args.cfg_scale is not None and args.cfg_scale < 0:
        raise UserError(f"--cfg-scale must be ≥ 0 (got {args.cfg_scale}); 0 is unconditional, 1 plain conditional")
    if args.eta is not None and args.eta < 0:
        raise UserError(f"--eta must be ≥ 0 (got {args.eta})")
    if gen.kind == "dcgan":
        given = [f"--{k.replace('_', '-')}" for k in DIFFUSION_ONLY if getattr(args, k) is not None]
        if args.bpd:
            given.append("--bpd")
        if args.no_clip:
            given.append("--no-clip")
        if given:
            raise UserError(f"{' '.join(given)} only apply to diffusion models; this checkpoint is a DCGAN")
    if args.cfg_scale is not None and gen.labels["kind"] == "none":
        raise UserError("--cfg-scale needs a conditional model; this one is unconditional")
    from tinyddpm import cond_eval, report

    modes = [flag for flag, on in (("--bpd", args.bpd), ("--eval-labels", cond_eval.wanted(args)),
                                   ("--report", report.wanted(args)), ("--fuse", args.fuse),
                                   ("--interpolate", args.interpolate)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are separate modes; run them one at a time")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from tinyddpm.devices import resolve_device
    from tinyddpm.files import check_output_dir
    from tinyddpm.generate import Generator

    device = resolve_device(args.device)
    check_output_dir(args.out)
    gen = Generator(args.ckpt, device, use_ema=not args.raw)
    check_args(args, gen)
    if args.bpd:
        return report_bpd(gen, args)
    # Other modes: conditional evaluation, quality report, fusion / interpolation.
    from tinyddpm import cond_eval, report

    if cond_eval.wanted(args):
        return cond_eval.run(args, gen)
    if report.wanted(args):
        return report.run(args, gen)
    if args.fuse or args.interpolate:
        from tinyddpm import fusion

        return fusion.run(args, gen)
    cond = gen.parse_condition(args.classes, args.labels, args.n)
    seeds = list(range(args.seed, args.seed + args.n))
    kw = {}
    if gen.kind == "ddpm":
        kw = dict(sampler=args.sampler or "ddim", steps=args.steps or DEFAULT_DDIM_STEPS, eta=args.eta or 0.0,
                  cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale, clip_x0=not args.no_clip)
    make_output_dir(args.out)
    t0 = time.perf_counter()

    def progress(done, total):
        dt = time.perf_counter() - t0
        print(f"{done}/{total} images | {done / dt:.2f} img/s | ETA {(total - done) * dt / done:.0f}s",
              file=sys.stderr, flush=True)

    images = gen.images(seeds, cond, args.batch_size, progress, **kw)
    save_images(images, seeds, args.out)
    print(f"wrote {len(images)} images and grid.png to {args.out}")
    return 0


def make_output_dir(out):
    """Create --out before any work is done, so an unwritable path fails at once."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}; choose a writable --out") from None


def save_images(images, seeds, out):
    from tinyddpm.imageio import make_grid, save_png

    for img, s in zip(images, seeds):
        save_png(img, os.path.join(out, f"{s:06d}.png"))
    save_png(make_grid(images), os.path.join(out, "grid.png"))


def report_bpd(gen, args):
    """The full variational bound (T network calls per image) on the first --n images of the test split."""
    import torch

    from tinyddpm import data as data_mod

    images, labels, _ = data_mod.load_dataset(gen.cfg.data, split="test")
    x = data_mod.to_float(images[: args.n])
    cond = None
    if gen.labels["kind"] != "none" and labels is not None:
        cond = labels[: args.n]
    g = torch.Generator().manual_seed(args.seed)
    total = []
    for i in range(0, len(x), args.batch_size):
        xb = x[i: i + args.batch_size].to(gen.device)
        c = None if cond is None else cond[i: i + args.batch_size]
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
