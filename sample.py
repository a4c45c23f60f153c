"""Sample images from a trained checkpoint (diffusion or DCGAN).

    python sample.py --n 64 --out samples/                                         # the newest run under runs/
    python sample.py --ckpt runs/<name>/ckpt.pt --sampler ddpm                     # all T ancestral steps
    python sample.py --ckpt ... --class frog --cfg-scale 3                         # class-conditional + guidance
    python sample.py --ckpt ... --labels "red cube, blue sphere" --cfg-scale 2     # multi-label model
    python sample.py --fuse a.png b.png --lam 0.5                                  # fuse two images
    python sample.py --ckpt ... --bpd --n 256                                      # VLB in bits/dim on the test split
    python sample.py --ckpt ... --report                                           # FID-1k, KID, real-vs-real floor
"""
import os
import sys

from tinyddpm.cli import eval_labels, fuse, images, quality
from tinyddpm.cli.common import RUNS_DIR, checkpoint_path, check_flags, say
from tinyddpm.constants import SAMPLERS, SPACINGS
from tinyddpm.errors import ArgumentParser, UserError, run_cli
from tinyddpm.generate import CLASS_AUTOGUIDANCE, DEFAULT_AUTOGUIDANCE, DEFAULT_BATCH, DEFAULT_N
from tinyddpm.report import REPORT_N
from tinyddpm.samplers import DDIM, DEFAULT_SAMPLER, DEFAULT_STEPS

DEFAULT_OUT = "samples"


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default=None,
                   help=f"checkpoint (runs/<name>/ckpt.pt) or its run folder (default: the newest under {RUNS_DIR}/)")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of images (default {DEFAULT_N}; --report: {REPORT_N}; --fuse: 1 per λ)")
    p.add_argument("--out", default=None,
                   help=f"output folder for the PNGs, grid.png and reports (default {DEFAULT_OUT}/, or {DEFAULT_OUT}-2/, "
                        f"{DEFAULT_OUT}-3/, … if it already holds files: a second run never overwrites the first)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help=f"sampler (default {DEFAULT_SAMPLER}; with --eta, --fuse or --interpolate: {DDIM.name})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"model calls (default {DEFAULT_STEPS}; --fuse/--interpolate: {DDIM.steps}; ddpm: all T)")
    p.add_argument("--eta", type=float, default=None, help="DDIM η in [0, 1]: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="the solvers' noise levels: uniform in t (default) or karras (docs/samplers.md)")
    p.add_argument("--churn", type=float, default=None, help="heun only: EDM's S_churn (default 0, the plain ODE)")
    p.add_argument("--autoguidance", type=float, default=None,
                   help=f"autoguidance w: the final weights pushed away from the early snapshot train.py keeps; 1 = "
                        f"off (default {DEFAULT_AUTOGUIDANCE:g} when the checkpoint has a snapshot, "
                        f"{CLASS_AUTOGUIDANCE:g} for a class-conditional one, else 1; --fuse/--interpolate: 1)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide (--cfg-scale, --autoguidance) only at noise levels LO < σ ≤ HI (Kynkäänniemi et al. "
                        "2024; HI may be inf), the plain model elsewhere (default: every level; docs/recipe.md)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (0 … 2**63 − 1)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per forward pass")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--posthoc-ema", type=float, default=None, metavar="SIGMA_REL",
                   help="use the post-hoc EMA of this relative length instead, rebuilt from the averages that "
                        "train.py --posthoc-ema stored in the run folder (docs/recipe.md)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--class", dest="classes", nargs="+", default=None, help="class name(s) for a class model")
    p.add_argument("--labels", default=None, help='label set for a multi-label model, e.g. "red cube, blue sphere"')
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance w: 1 = plain conditional (default), 0 = unconditional, >1 stronger")
    p.add_argument("--bpd", action="store_true", help="report the VLB in bits/dim on --n test images instead")
    eval_labels.add_args(p)
    fuse.add_args(p)
    quality.add_args(p)
    return p


def pick_mode(args):
    """The one mode asked for: None (plain sampling), --bpd, --eval-labels, --report, --fuse or --interpolate."""
    modes = [flag for flag, on in (("--bpd", args.bpd), ("--eval-labels", eval_labels.wanted(args)),
                                   ("--report", quality.wanted(args)), ("--fuse", args.fuse),
                                   ("--interpolate", args.interpolate)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} are separate modes; run them one at a time")
    return modes[0] if modes else None


MODES = {None: images.run, "--bpd": images.run_bpd, "--eval-labels": eval_labels.run, "--report": quality.run,
         "--fuse": fuse.run, "--interpolate": fuse.run}


def main(argv=None):
    args = build_parser().parse_args(argv)
    from tinyddpm.devices import resolve_device
    from tinyddpm.files import check_output_dir, removed_if_unused, unused_folder
    from tinyddpm.generate import LoadedModel

    mode = pick_mode(args)
    device = resolve_device(args.device)
    if args.out is None:
        args.out = unused_folder(DEFAULT_OUT)
    elif os.path.isdir(check_output_dir(args.out)) and os.listdir(args.out):  # a file in the way is refused too
        raise UserError(f"--out {args.out} already holds files, and sample.py writes only into a new or empty folder "
                        f"(so nothing there is overwritten); choose another, or drop --out ({DEFAULT_OUT}/, "
                        f"{DEFAULT_OUT}-2/, … are picked for you)")
    if args.raw and args.posthoc_ema is not None:
        raise UserError("--raw and --posthoc-ema choose different weights; pass one of them")
    loaded = LoadedModel(checkpoint_path(args), device, use_ema=not args.raw, posthoc_ema=args.posthoc_ema)
    if loaded.weights_note:
        say(loaded.weights_note)
    check_flags(args, loaded, mode)
    with removed_if_unused(args.out):  # each mode makes --out (files.prepare_output_dir) before its slow work
        return MODES[mode](args, loaded)


if __name__ == "__main__":
    from tinyddpm.cpu import configure  # threads follow the free cores (tinyddpm/cpu.py)

    sys.exit(run_cli(main, setup=configure))
