"""Generating images from a checkpoint: rebuild the model, resolve the condition, run a sampler in batches.

Shared by sample.py's modes (default, fusion, the quality report, the conditional evaluation). How images are drawn
is one `SamplingOptions`, resolved from the flags and checked once. Image i uses seed `seed + i`, so it is the same
image whatever --batch-size is, and `LoadedModel.batches` makes them one batch at a time: N images need the memory
of one batch, not of N.
"""
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .cpu import follow_free_cores
from .devices import autocast
from .errors import UserError
from .imageio import to_pixels
from .models import build_diffusion, build_gan, build_unet
from .samplers import SAMPLERS, SPACINGS, autoguided, check_options, guided, sample as run_sampler

# sample.py's sampler and model calls when --sampler / --steps are not given (images and --report). Chosen from
# the FID-vs-calls table in docs/samplers.md (the README's 8,000-step tiny cat model): the best FID at 50 calls or
# fewer, SDE-DPM-Solver++(2M) at 50 (81.04 against 84.03 at 20), which makes the report's 1,000 cats in ~105 s on
# 2 CPU cores. The deterministic solvers (DDIM η = 0, DPM-Solver++, Heun) score 30-40 % worse on such a young model.
DEFAULT_SAMPLER = "dpmpp-2m-sde"
DEFAULT_STEPS = 50
# Autoguidance w when the checkpoint holds an early snapshot (train.py's --guide-at; docs/recipe.md, seventh and
# eighth rounds). Each sampler step then runs both networks, so sampling takes about twice as long.
# Unconditional cats of the tiny preset (snapshot of step 2,000): FID-1k 71.60 at w = 1.5, 71.11 at w = 2 (80.86
# without); shapes (label sets) at guidance 2: 67.5 % at w = 1.5, 68.8 % at w = 2 (67.6 % without).
DEFAULT_AUTOGUIDANCE = 2.0
# Class-conditional cat + frog: 76.64 / 61.28 at w = 1.5 against 79.78 / 69.53 at w = 2 (88.45 / 73.91 without).
CLASS_AUTOGUIDANCE = 1.5
# Fusion and interpolation keep deterministic DDIM: interpolation must invert exactly, and fusion's figures and
# docs are DDIM's. Their step count when --steps is not given:
DDIM_SAMPLER = "ddim"
DEFAULT_DDIM_STEPS = 100
DEFAULT_N = 64  # images when --n is not given (the modes that make something else say so)
DEFAULT_BATCH = 256  # images per forward pass
MAX_SEED = 2**63 - 1  # image i's seed, --seed + i, is an int64 (config.check_values' rule for every int)
MAX_BATCH = 65_536  # far beyond any memory; a typo gets one line instead of an out-of-memory traceback


@dataclass(frozen=True)
class SamplingOptions:
    """How a mode draws its images: resolved once from sample.py's flags, checked once (`check`: each field against
    its metadata with config.check_values, then what spans fields and the sampler's own rules), passed to every
    mode. A DCGAN uses only n, seed and batch_size."""
    n: int = field(default=DEFAULT_N, metadata=dict(min=1, help="number of images"))
    seed: int = field(default=0, metadata=dict(min=0, max=MAX_SEED, help="image i uses seed + i"))
    batch_size: int = field(default=DEFAULT_BATCH, metadata=dict(min=1, max=MAX_BATCH, help="images per pass"))
    sampler: str = field(default=DEFAULT_SAMPLER, metadata=dict(choices=SAMPLERS, help="samplers.SAMPLERS"))
    steps: int = field(default=DEFAULT_STEPS, metadata=dict(min=1, help="model calls (samplers.model_calls)"))
    # η > 1 would ask for more noise than the step has (σ² > 1 − ᾱ_prev): refused rather than silently clamped.
    eta: float = field(default=0.0, metadata=dict(min=0.0, max=1.0, help="DDIM η: 0 deterministic, 1 DDPM-like"))
    cfg_scale: float = field(default=1.0, metadata=dict(min=0.0, help="guidance w: 0 unconditional, 1 plain"))
    clip_x0: bool = field(default=True, metadata=dict(flag="--no-clip", help="clip the predicted x0 to [-1, 1]"))
    spacing: str = field(default="uniform", metadata=dict(choices=SPACINGS, help="the solvers' noise levels"))
    churn: float = field(default=0.0, metadata=dict(min=0.0, help="heun's S_churn"))
    autoguidance: float = field(default=1.0, metadata=dict(min=0.0, help="autoguidance w: 1 off, >1 stronger"))

    def check(self, num_timesteps=None, gen=None):
        """Every value, once; `num_timesteps` (a diffusion model's T) adds the sampler's own rules, `gen` (the
        LoadedModel) whether it can autoguide. Returns self."""
        from .config import check_values

        check_values(self)
        if self.seed + self.n - 1 > MAX_SEED:
            raise UserError(f"--seed {self.seed} with --n {self.n} runs past the largest seed (2**63 − 1 = "
                            f"{MAX_SEED}); use a smaller --seed or --n")
        if num_timesteps is not None:
            try:
                check_options(self.sampler, num_timesteps, self.steps, self.eta, None, self.spacing, self.churn)
            except ValueError as e:
                raise UserError(f"--sampler {self.sampler}: {e}") from None
        if gen is not None:
            gen.check_autoguidance(self.autoguidance)
        return self

    def seeds(self):
        """The per-image seeds, lazily: a range, so --n 10**9 costs nothing until each batch is made."""
        return range(self.seed, self.seed + self.n)

    @property
    def sample_kw(self):
        """The keyword arguments of `LoadedModel.sample` (a DCGAN ignores them)."""
        d = asdict(self)
        return {k: d[k] for k in ("sampler", "steps", "eta", "cfg_scale", "clip_x0", "spacing", "churn",
                                  "autoguidance")}


class LoadedModel:
    """A checkpoint loaded and ready to sample (diffusion or DCGAN): `.images(seeds, cond)` → uint8 [B, H, W, 3].

    (Not a "Generator": that name belongs to DCGAN's network and to torch's random number generator.)"""

    def __init__(self, ckpt_path, device, use_ema=True):
        ckpt = load_checkpoint(ckpt_path)
        self.ckpt, self.cfg, self.labels, self.device = ckpt, ckpt["run_config"], ckpt["labels"], device
        self.kind, self.step = ckpt["kind"], ckpt["step"]
        weights = "ema" if use_ema else ("model" if self.kind == "ddpm" else "generator")
        # The autoguidance model (ema.Snapshot): the EMA weights early in training, if the run kept them.
        snapshot = ckpt["models"].get("guide") if self.kind == "ddpm" else None
        self.guide, self.guide_step = None, None
        if self.kind == "ddpm":
            self.model = build_unet(self.cfg, self.labels)
            self.diffusion = build_diffusion(self.cfg)
            if snapshot:
                self.guide = build_unet(self.cfg, self.labels)
        else:
            self.model, _ = build_gan(self.cfg, self.labels)
            self.diffusion = None
        try:
            self.model.load_state_dict(ckpt["models"][weights])
            if self.guide is not None:
                self.guide.load_state_dict(snapshot["weights"])
                self.guide_step = int(snapshot["step"])
                self.guide.to(device).eval()
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{ckpt_path}: its weights do not match its own config ({e.__class__.__name__}); "
                            "the file is damaged or was edited") from None
        self.model.to(device).eval()

    @property
    def image_size(self):
        return self.cfg.data.image_size

    # --- conditions ---------------------------------------------------------------------------------------------
    def parse_condition(self, classes=None, labels=None):
        """The condition as one period of rows that images cycle through (image i gets row i % P): class indices
        [P] for the given classes (all of them when none is given), a multi-hot [1, K], or None."""
        kind, names = self.labels["kind"], self.labels["names"]
        if kind == "none":
            if classes or labels:
                raise UserError("this model is unconditional; drop --class/--labels (and --cfg-scale)")
            return None
        if kind == "class":
            if labels:
                raise UserError(f"this model is conditioned on classes, not label sets; use --class with one of "
                                f"{', '.join(names)}")
            if not classes:
                print(f"no --class given: cycling through all classes ({', '.join(names)})", file=sys.stderr)
                classes = names
            idx = []
            for c in classes:
                key = str(c).strip().lower()
                if key not in names:
                    raise UserError(f"class {c!r} was not trained; this model knows: {', '.join(names)}")
                idx.append(names.index(key))
            return torch.tensor(idx, dtype=torch.long)
        # multi-label
        if classes:
            raise UserError("this model is conditioned on label sets; use --labels \"red cube, blue sphere\"")
        if not labels:
            raise UserError(f"this model needs --labels, e.g. --labels \"{names[0]}, {names[-1]}\"; known labels: "
                            f"{', '.join(names)}")
        return torch.from_numpy(parse_label_text(labels, names)).float().unsqueeze(0)

    # --- sampling -------------------------------------------------------------------------------------------------
    def model_fn(self, cond, cfg_scale, autoguidance=1.0):
        """The sampler's model function: classifier-free guidance (w = cfg_scale) of each network, then
        autoguidance (w = autoguidance) of the final weights against the early snapshot."""
        cond = None if cond is None else cond.to(self.device)
        fn = guided(self.model, cond, None, cfg_scale)
        if autoguidance == 1.0:
            return fn
        self.check_autoguidance(autoguidance)
        return autoguided(fn, guided(self.guide, cond, None, cfg_scale), autoguidance)

    def default_autoguidance(self):
        """For a checkpoint with an early snapshot CLASS_AUTOGUIDANCE (a class-conditional model) or
        DEFAULT_AUTOGUIDANCE, else 1 (off)."""
        if self.guide is None:
            return 1.0
        return CLASS_AUTOGUIDANCE if self.labels["kind"] == "class" else DEFAULT_AUTOGUIDANCE

    def check_autoguidance(self, w):
        if w != 1.0 and self.guide is None:
            raise UserError(f"--autoguidance {w:g} needs the early snapshot that train.py keeps (--guide-at > 0); "
                            "this checkpoint has none (a DCGAN, --guide-at 0, a run shorter than the snapshot step, "
                            "or an older tinyddpm): drop --autoguidance")

    @torch.no_grad()
    def sample(self, seeds, cond=None, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, eta=0.0, cfg_scale=1.0,
               clip_x0=True, x_start=None, t_start=None, autoguidance=1.0, **solver_kw):
        """Float images [B, 3, S, S] in [−1, 1] for the given per-image seeds; solver_kw (spacing, churn) go to
        samplers.sample."""
        if self.kind == "dcgan":
            from .dcgan import sample_z

            z = sample_z(seeds, self.cfg.gan.z_dim).to(self.device)
            return self.model(z, None if cond is None else cond.to(self.device)).float()
        shape = (3, self.image_size, self.image_size)
        fn = self.model_fn(cond, cfg_scale, autoguidance)

        def followed(x, t):  # a report samples for minutes: follow a neighbour that starts or stops meanwhile
            follow_free_cores()
            return fn(x, t)

        with autocast(self.device):
            return run_sampler(sampler, self.diffusion, followed, shape, seeds, self.device, steps, eta, clip_x0,
                               x_start, t_start, **solver_kw)

    def batches(self, seeds, cond=None, batch_size=DEFAULT_BATCH, progress=None, **sample_kw):
        """Yield (the batch's seeds, uint8 [b, S, S, 3]) one batch at a time, made only when asked for, so a caller
        that writes each batch holds one batch in memory. cond: rows cycled over the images (see cycle);
        progress(done, total) after each batch."""
        for i in range(0, len(seeds), batch_size):
            chunk = seeds[i: i + batch_size]
            images = to_pixels(self.sample(chunk, cycle(cond, i, i + len(chunk)), **sample_kw))
            if progress:
                progress(i + len(chunk), len(seeds))
            yield chunk, images

    def images(self, seeds, cond=None, batch_size=DEFAULT_BATCH, progress=None, **sample_kw):
        """All images at once, uint8 [N, S, S, 3], for a caller that needs them together (the report's features,
        the evaluator)."""
        out = [images for _, images in self.batches(seeds, cond, batch_size, progress, **sample_kw)]
        return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)


def cycle(cond, start, stop):
    """Rows start … stop−1 of the endless repetition of `cond` ([P] or [P, K]): image i gets row i % P. None stays
    None. One period stands for any number of images, so a condition costs nothing per image."""
    if cond is None:
        return None
    return cond[torch.arange(start, stop) % len(cond)]


def parse_label_text(text, names):
    """'red cube, blue sphere' → multi-hot float32 [K] over the model's vocabulary `names`."""
    from .shapes import parse_labels, VOCAB

    if list(names) != list(VOCAB):
        raise UserError("this checkpoint's label vocabulary differs from the shapes dataset's; retrain it")
    return parse_labels(text)


class Progress:
    """The progress line every mode prints on stderr after each batch: `<what>done/total images | img/s | ETA`."""

    def __init__(self, what=""):
        self.what, self.t0 = what, time.perf_counter()

    def __call__(self, done, total):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        print(f"{self.what}{done}/{total} images | {done / dt:.2f} img/s | ETA {(total - done) * dt / done:.0f}s",
              file=sys.stderr, flush=True)
