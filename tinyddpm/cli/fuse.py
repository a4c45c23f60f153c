"""sample.py --fuse A B and --interpolate A B (the library: tinyddpm/fusion.py; docs/fusion.md)."""
import os

import torch

from ..files import prepare_output_dir
from ..fusion import (DEFAULT_FRAMES, DEFAULT_LAM, MAX_FRAMES, NOISE_MODES, FusionOptions, InterpolationOptions,
                      fuse_rows, interpolate, load_image, psnr, strip)
from ..errors import UserError
from ..imageio import save_png, to_pixels
from ..samplers import DDIM
from .common import Progress, flags_given, sampling_options

FUSE_ONLY = ("lam", "t", "noise")
INTERPOLATE_ONLY = ("frames", "inversion_steps")


def add_args(p):
    g = p.add_argument_group("fusion and interpolation (docs/fusion.md)")
    g.add_argument("--fuse", nargs="+", metavar="IMAGE", default=None,
                   help="fuse two images A B: noise both to --t, mix (1−λ)·A + λ·B, denoise to 0; writes fused*.png "
                        "and strip*.png (A | fusions | B). --n fusions per λ (default 1), seeds --seed …")
    g.add_argument("--interpolate", nargs="+", metavar="IMAGE", default=None,
                   help="interpolate two images A B: DDIM-invert both to x_T, slerp, decode --frames frames "
                        "(frame_*.png, strip.png); prints the endpoints' reconstruction PSNR")
    g.add_argument("--lam", nargs="+", type=float, default=None,
                   help=f"fusion weight(s) λ ∈ [0, 1] of the SECOND image B: 0 = A, 1 = B (default {DEFAULT_LAM}); "
                        "several λ give one strip per seed")
    g.add_argument("--t", type=int, default=None,
                   help="fusion noise level in paper steps 1 … T (default T/2: 500 for T = 1000); "
                        "schedule index t−1")
    g.add_argument("--noise", choices=NOISE_MODES, default=None,
                   help="fusion noise: shared (default; one ε for both, the mix is the forward process of the "
                        "pixel mix) or independent (one ε each)")
    g.add_argument("--frames", type=int, default=None,
                   help=f"interpolation frames including both ends, 2 … {MAX_FRAMES} (default {DEFAULT_FRAMES})")
    g.add_argument("--inversion-steps", type=int, default=None,
                   help="DDIM steps of the inversion (default: --steps, which gives the closest round trip)")


def options(args, loaded):
    """(SamplingOptions, FusionOptions or InterpolationOptions): every mistake of the command as one line, before
    any image is read. Fusion and interpolation keep the plain model (no autoguidance) and DDIM 100 by default."""
    mode = "--fuse" if args.fuse else "--interpolate"
    if loaded.kind != "ddpm":
        raise UserError(f"{mode} needs a diffusion model; {loaded.path} is a {loaded.kind.upper()} checkpoint")
    paths = args.fuse or args.interpolate
    if len(paths) != 2:
        raise UserError(f"{mode} takes exactly two images A B (got {len(paths)})")
    other = flags_given(args, INTERPOLATE_ONLY if args.fuse else FUSE_ONLY)
    if other:
        raise UserError(f"{' '.join(other)} only apply to {'--interpolate' if args.fuse else '--fuse'}")
    T = loaded.diffusion.num_timesteps
    if args.fuse:
        task = FusionOptions(lams=tuple(args.lam or (DEFAULT_LAM,)), t=args.t, noise=args.noise or "shared").check(T)
        return sampling_options(args, loaded, n=1, sampler=DDIM, autoguidance=1.0), task
    sampling = sampling_options(args, loaded, n=1, sampler=DDIM, autoguidance=1.0)  # a bad value: its own line
    if args.sampler not in (None, "ddim") or args.eta or args.spacing not in (None, "uniform"):
        raise UserError("--interpolate inverts and decodes with deterministic DDIM (η = 0, uniform steps); "
                        "drop --sampler / --eta / --spacing")
    if args.classes and len(args.classes) > 1:
        raise UserError("--interpolate takes one --class (both inputs are encoded with it)")
    task = InterpolationOptions(frames=args.frames or DEFAULT_FRAMES, inversion_steps=args.inversion_steps).check()
    return sampling, task


def condition(args, loaded):
    """The inputs' condition; a class model needs --class (fusion must not cycle through every class)."""
    if loaded.labels["kind"] == "class" and not args.classes:
        raise UserError(f"this model is class-conditional; give the inputs' class with --class "
                        f"(one of {', '.join(loaded.labels['names'])})")
    return loaded.condition(args.classes, args.labels)


def run(args, loaded):
    """Fuse or interpolate A and B, writing PNGs and strips into --out."""
    opts, task = options(args, loaded)
    a, b = (load_image(p, loaded.image_size) for p in (args.fuse or args.interpolate))
    cond = condition(args, loaded)
    out = prepare_output_dir(args.out)
    a8, b8 = to_pixels(torch.stack([a, b]))
    if args.fuse:
        return _write_fusions(loaded, (a, b), (a8, b8), task, opts, cond, out)
    return _write_interpolation(loaded, (a, b), (a8, b8), task, opts, cond, out)


def _write_fusions(loaded, pair, pair8, fusion, opts, cond, out):
    """--n fusions per λ (default 1), written seed by seed as they are made."""
    lams, (a8, b8) = fusion.lams, pair8
    single = opts.n == 1 and len(lams) == 1
    for seeds, fused in fuse_rows(loaded, *pair, fusion, opts, cond, Progress()):
        for s, row in zip(seeds, fused):
            row = to_pixels(row)  # [L, S, S, 3]
            for lam, img in zip(lams, row):
                save_png(img, os.path.join(out, "fused.png" if single else f"fused_seed{s:06d}_lam{lam:g}.png"))
            save_png(strip(a8, row, b8), os.path.join(out, "strip.png" if single else f"strip_seed{s:06d}.png"))
    T = loaded.diffusion.num_timesteps
    print(f"wrote {opts.n * len(lams)} fusion(s) and {opts.n} strip(s) (A | λ = {', '.join(f'{x:g}' for x in lams)} "
          f"| B) to {out}: t = {fusion.step(T)} of T = {T}, {fusion.noise} noise, {opts.sampler.name} sampler")
    return 0


def _write_interpolation(loaded, pair, pair8, interpolation, opts, cond, out):
    (a8, b8), steps = pair8, opts.sampler.calls()
    decoded, _ = interpolate(loaded, *pair, interpolation, opts, cond, Progress())
    imgs = to_pixels(decoded)
    for k, img in enumerate(imgs):
        save_png(img, os.path.join(out, f"frame_{k:03d}.png"))
    save_png(strip(a8, imgs, b8), os.path.join(out, "strip.png"))
    print(f"wrote {interpolation.frames} frames and strip.png to {out}; endpoint reconstruction PSNR: "
          f"A {psnr(imgs[0], a8):.2f} dB, B {psnr(imgs[-1], b8):.2f} dB "
          f"(inversion {interpolation.inversion_steps or steps} steps, decoding {steps} steps)")
    return 0
