"""What every mode of sample.py shares: which mode was asked for, which checkpoint, and the sampling flags
resolved once into one checked generate.SamplingOptions."""
import glob
import os
import stat
import sys
import time

from ..checkpoint import CKPT_NAME
from ..errors import UserError
from ..generate import DEFAULT_N, SamplingOptions
from ..samplers import DDIM, SamplerOptions

RUNS_DIR = "runs"  # where train.py puts its run folders, and where sample.py looks when --ckpt is not given
TRAIN_HINT = "python train.py --dataset cifar --class cat"
SAMPLING_FLAGS = ("sampler", "steps", "eta", "cfg_scale", "spacing", "churn", "autoguidance",  # diffusion only
                  "guidance_interval")


def say(message):
    """Progress and notes for people: stderr, so stdout holds only results."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """The progress line every mode prints on stderr after each batch: `<what>done/total images | img/s | ETA`."""

    def __init__(self, what=""):
        self.what, self.t0 = what, time.perf_counter()

    def __call__(self, done, total):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        say(f"{self.what}{done}/{total} images | {done / dt:.2f} img/s | ETA {(total - done) * dt / done:.0f}s")


def flags_given(args, names):
    """The flags among `names` (argparse dests) that the user gave, as they are spelled on the command line."""
    return [f"--{k.replace('_', '-')}" for k in names if getattr(args, k) not in (None, False)]


def newest_checkpoint(runs_dir=RUNS_DIR):
    """The most recently written <runs_dir>/*/ckpt.pt (a regular file), or a UserError saying how to get one."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(runs_dir), "*", CKPT_NAME)):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((st.st_mtime_ns, path))
    if not found:
        raise UserError(f"no --ckpt given and no trained run under {runs_dir}/; train one with `{TRAIN_HINT}`, or "
                        "pass --ckpt runs/<name>/ckpt.pt")
    return max(found)[1]


def checkpoint_path(args):
    """--ckpt, or the newest run under runs/ (and a line saying which)."""
    if args.ckpt is not None:
        return args.ckpt
    path = newest_checkpoint()
    say(f"no --ckpt given: using {path}, the newest run under {RUNS_DIR}/")
    return path


def check_flags(args, loaded, mode):
    """The flags that do not fit this checkpoint or mode, before anything is made."""
    sampling = flags_given(args, SAMPLING_FLAGS)
    if loaded.kind == "dcgan":
        given = sampling + flags_given(args, ("bpd", "no_clip"))
        if given:
            raise UserError(f"{' '.join(given)} only apply to diffusion models; this checkpoint is a DCGAN")
    if args.cfg_scale is not None and loaded.labels["kind"] == "none":
        raise UserError("--cfg-scale needs a conditional model; this one is unconditional")
    if mode == "--bpd" and sampling:
        raise UserError(f"{' '.join(sampling)} do not apply to --bpd (it scores test images; nothing is sampled)")
    if args.n is not None and mode in ("--interpolate", "--eval-labels"):
        instead = "--frames" if mode == "--interpolate" else "--n-per-set and --n-sets"
        raise UserError(f"--n does not apply to {mode}; use {instead}")


def sampling_options(args, loaded, n=DEFAULT_N, sampler=SamplerOptions(), autoguidance=None, guidance_scale=None):
    """The flags resolved once into a checked SamplingOptions, with the mode's defaults: n images (when --n is not
    given), the sampler (when --sampler is not given) and the autoguidance w (None: the checkpoint's default);
    guidance_scale, when given, stands in for --cfg-scale (a mode that sets the scale itself)."""
    if args.eta is not None and args.sampler is None:  # η is DDIM's alone: `--eta 1` keeps meaning DDIM
        sampler = DDIM
    name = args.sampler or sampler.name
    steps = args.steps if args.steps is not None else sampler.steps if name == sampler.name else None
    chosen = SamplerOptions(name=name, steps=steps, eta=0.0 if args.eta is None else args.eta,
                            spacing=args.spacing or "uniform", churn=0.0 if args.churn is None else args.churn,
                            clip_x0=not args.no_clip)
    if args.autoguidance is not None:
        autoguidance = args.autoguidance
    elif autoguidance is None:
        autoguidance = loaded.default_autoguidance()
    if guidance_scale is None:
        guidance_scale = 1.0 if args.cfg_scale is None else args.cfg_scale
    return SamplingOptions(n=n if args.n is None else args.n, seed=args.seed, batch_size=args.batch_size,
                           sampler=chosen, guidance_scale=guidance_scale, autoguidance=autoguidance,
                           guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval)
                           ).check(loaded)
