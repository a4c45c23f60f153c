"""Generating images from a checkpoint: rebuild the networks, resolve the condition, run a sampler in batches.

`LoadedModel` is a checkpoint ready to sample (diffusion or DCGAN); `SamplingOptions` says how images are drawn
(how many, their seeds, the batch, the sampler, the two guidances and the noise levels they act at), checked once.
Image i uses seed `seed + i`, so it is the same image whatever the batch size, and `LoadedModel.batches` makes them
one batch at a time: N images need the memory of one batch, not of N. Every mode of sample.py goes through
`LoadedModel.sample`, which never returns a non-finite image.
"""
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .checkpoint import load_checkpoint, nonfinite_tensor
from .checks import check_values
from .constants import MAX_BATCH, MAX_SEED
from .cpu import follow_free_cores
from .devices import autocast
from .ema import check_snapshot
from .errors import UserError
from .guidance import autoguided, classifier_free, limited
from .imageio import to_pixels
from .models import build_diffusion, build_gan, build_guide, build_unet
from .posthoc_ema import rebuild
from .samplers import ImageNoise, SamplerOptions, sample as run_sampler

DEFAULT_N = 64  # images when --n is not given (the modes that make something else say so)
DEFAULT_BATCH = 256  # images per forward pass
# Autoguidance w when the checkpoint holds an early snapshot (train.py's --guide-at): each sampler step then runs
# both networks, so sampling takes about twice as long. Chosen per kind of condition (docs/recipe.md).
DEFAULT_AUTOGUIDANCE = 2.0
CLASS_AUTOGUIDANCE = 1.5  # for a class-conditional model


@dataclass(frozen=True)
class SamplingOptions:
    """How a mode draws its images, checked once (`check`) and passed whole. A DCGAN uses only n, seed and
    batch_size."""
    n: int = field(default=DEFAULT_N, metadata=dict(min=1, help="number of images"))
    seed: int = field(default=0, metadata=dict(min=0, max=MAX_SEED, help="image i uses seed + i"))
    batch_size: int = field(default=DEFAULT_BATCH, metadata=dict(min=1, max=MAX_BATCH, help="images per pass"))
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    guidance_scale: float = field(default=1.0, metadata=dict(min=0.0, flag="--cfg-scale",
                                                             help="classifier-free w: 0 unconditional, 1 plain"))
    autoguidance: float = field(default=1.0, metadata=dict(min=0.0, help="autoguidance w: 1 off, >1 stronger"))
    # (LO, HI]: both guidances act only at noise levels σ in it, the plain model elsewhere (None: at every level).
    guidance_interval: Optional[tuple] = field(default=None, metadata=dict(
        type=float, min=0.0, finite=False, min_items=2, help="σ interval (LO, HI] where guidance acts"))

    def check(self, loaded):
        """Every value, once, and what spans fields or depends on the checkpoint `loaded` (a LoadedModel)."""
        check_values(self)
        if self.seed + self.n - 1 > MAX_SEED:
            raise UserError(f"--seed {self.seed} with --n {self.n} runs past the largest seed (2**63 − 1 = "
                            f"{MAX_SEED}); use a smaller --seed or --n")
        if loaded.kind == "ddpm":
            self.sampler.check(loaded.diffusion.num_timesteps)
            loaded.check_autoguidance(self.autoguidance)
        if self.guidance_interval is not None:
            self.check_interval()
        return self

    def check_interval(self):
        lo, hi, *more = self.guidance_interval
        if more or not lo < hi:
            shown = " ".join(f"{v:g}" for v in self.guidance_interval)
            raise UserError(f"--guidance-interval takes two noise levels LO < HI (got {shown}), e.g. "
                            "--guidance-interval 0.28 inf")
        if self.guidance_scale == 1.0 and self.autoguidance == 1.0:
            raise UserError("--guidance-interval limits guidance, but none is on (--cfg-scale 1 and --autoguidance "
                            "1, or a checkpoint without a snapshot): drop it, or turn a guidance on")

    def seeds(self):
        """The per-image seeds, lazily: a range, so --n 10**9 costs nothing until each batch is made."""
        return range(self.seed, self.seed + self.n)


def _finite_weights(state, what, path):
    """Refuse a state dict holding NaN or inf: such weights sample constant (black) images."""
    name = nonfinite_tensor(state)
    if name:
        raise UserError(f"{path}: the {what} weights hold NaN or inf ({name}); training diverged or the file "
                        "was damaged: use an earlier checkpoint, or retrain with a lower --lr")


class LoadedModel:
    """A checkpoint loaded and ready to sample (diffusion or DCGAN): `.images(seeds, cond, options)` → uint8
    [B, H, W, 3]. `net` is the network that samples (the EMA weights unless use_ema=False), `guide_net` the early
    snapshot that autoguidance pushes away from (None when the run kept none). `posthoc_ema`: a σ_rel, to sample
    with the post-hoc EMA of that length rebuilt from the run's stored averages (posthoc_ema.rebuild) instead; its
    fit is described in `.weights_note`."""

    def __init__(self, ckpt_path, device, use_ema=True, posthoc_ema=None):
        ckpt = load_checkpoint(ckpt_path)
        self.ckpt, self.cfg, self.labels, self.device = ckpt, ckpt["run_config"], ckpt["labels"], device
        self.kind, self.step, self.path, self.use_ema = ckpt["kind"], ckpt["step"], ckpt_path, use_ema
        self.posthoc_ema, self.weights_note = posthoc_ema, None
        weights = "ema" if use_ema else ("model" if self.kind == "ddpm" else "generator")
        self.guide_net, self.guide_step, self.diffusion = None, None, None
        try:
            state = ckpt["models"][weights]
            _finite_weights(state, "EMA" if use_ema else "raw", ckpt_path)
            if self.kind == "ddpm":
                self.net, self.diffusion = build_unet(self.cfg, self.labels), build_diffusion(self.cfg)
                snapshot = ckpt["models"].get("guide")
                # The network the snapshot fits (the model's own, or the narrow guide of --guide-channels); built
                # only when there is a snapshot to check (an empty or missing one is None before `like` is read).
                guide_net = build_guide(self.cfg, self.labels) if snapshot else None
                try:
                    self.guide_step = check_snapshot(snapshot, guide_net)  # names, shapes, finite values, step ≥ 1
                except ValueError as e:
                    raise UserError(f"{ckpt_path}: {e}; the file is damaged or was edited") from None
                if self.guide_step is not None:
                    self.guide_net = guide_net
                    self.guide_net.load_state_dict(snapshot["weights"])
                    self.guide_net.to(device).eval()
            else:
                self.net, _ = build_gan(self.cfg, self.labels)
            if posthoc_ema is not None:
                run_dir = ckpt_path if os.path.isdir(ckpt_path) else os.path.dirname(os.path.abspath(ckpt_path))
                state, self.weights_note = rebuild(run_dir, posthoc_ema, self.step, self.cfg.train.posthoc_ema,
                                                   self.net)
            self.net.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise UserError(f"{ckpt_path}: its weights do not match its own config ({e.__class__.__name__}); "
                            "the file is damaged or was edited") from None
        self.net.to(device).eval()

    @property
    def image_size(self):
        return self.cfg.data.image_size

    # --- conditions ---------------------------------------------------------------------------------------------
    def condition(self, classes=None, labels=None):
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
            return torch.tensor([self.class_index(c) for c in classes or names], dtype=torch.long)
        if classes:
            raise UserError("this model is conditioned on label sets; use --labels \"red cube, blue sphere\"")
        if not labels:
            raise UserError(f"this model needs --labels, e.g. --labels \"{names[0]}, {names[-1]}\"; known labels: "
                            f"{', '.join(names)}")
        return torch.from_numpy(parse_label_text(labels, names)).float().unsqueeze(0)

    def class_index(self, name):
        """The index of a class the model was trained on, by name (any case)."""
        names, key = self.labels["names"], str(name).strip().lower()
        if key not in names:
            raise UserError(f"class {name!r} was not trained; this model knows: {', '.join(names)}")
        return names.index(key)

    # --- guidance -----------------------------------------------------------------------------------------------
    def default_autoguidance(self):
        """CLASS_AUTOGUIDANCE for a class-conditional checkpoint with an early snapshot, DEFAULT_AUTOGUIDANCE for
        another one with a snapshot, else 1 (off)."""
        if self.guide_net is None:
            return 1.0
        return CLASS_AUTOGUIDANCE if self.labels["kind"] == "class" else DEFAULT_AUTOGUIDANCE

    def check_autoguidance(self, w):
        if w != 1.0 and self.guide_net is None:
            raise UserError(f"--autoguidance {w:g} needs the early snapshot that train.py keeps (--guide-at > 0); "
                            "this checkpoint has none (a DCGAN, --guide-at 0, a run shorter than the snapshot step, "
                            "or an older tinyddpm): drop --autoguidance")

    def network_fn(self, cond, guidance_scale=1.0, autoguidance=1.0, interval=None):
        """The function a sampler calls, fn(x [B, C, H, W], t [B]) → output: classifier-free guidance (w =
        guidance_scale) of each network, then autoguidance (w = autoguidance) of the final one against the early
        snapshot (tinyddpm/guidance.py); with `interval` (LO, HI), both only where LO < σ(t) ≤ HI."""
        cond = None if cond is None else cond.to(self.device)
        fn = classifier_free(self.net, cond, guidance_scale)
        if autoguidance != 1.0:
            self.check_autoguidance(autoguidance)
            fn = autoguided(fn, classifier_free(self.guide_net, cond, guidance_scale), autoguidance)
        if interval is None:
            return fn
        lo, hi = interval

        def active(t):  # t [B] → [B] bool on t's device; σ(t) in float64, as the samplers compute it
            sigma = torch.from_numpy(self.diffusion.sigma(t.detach().cpu().double().numpy()))
            return ((sigma > lo) & (sigma <= hi)).to(t.device)

        return limited(fn, classifier_free(self.net, cond, 1.0), active)

    # --- sampling -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, seeds, cond, options, x_start=None, t_start=None):
        """Float images [B, 3, S, S] in [−1, 1] for the per-image `seeds` (cond: [B] or [B, K] rows, or None);
        from x_start noised to t_start when given (fusion). Raises UserError rather than return NaN or inf."""
        if self.kind == "dcgan":
            from .dcgan import sample_z

            z = sample_z(seeds, self.cfg.gan.z_dim).to(self.device)
            x = self.net(z, None if cond is None else cond.to(self.device)).float()
        else:
            fn = self.network_fn(cond, options.guidance_scale, options.autoguidance, options.guidance_interval)

            def followed(x, t):  # a report samples for minutes: follow a neighbour that starts or stops meanwhile
                follow_free_cores()
                return fn(x, t)

            noise = ImageNoise(seeds, (3, self.image_size, self.image_size), self.device)
            with autocast(self.device):
                x = run_sampler(self.diffusion, followed, options.sampler, noise, x_start, t_start)
        if not torch.isfinite(x).all():
            raise UserError(f"sampling gave NaN or inf (seeds {seeds[0]} … {seeds[-1]}), so nothing of it was "
                            "written: lower --cfg-scale or --autoguidance, drop --no-clip, or use another checkpoint")
        return x

    def batches(self, cond, options, callback=None):
        """Yield (the batch's seeds, uint8 [b, S, S, 3]) for options.seeds(), one batch at a time, made only when
        asked for, so a caller that writes each batch holds one batch in memory. cond: rows cycled over the images
        (see cycle); callback(done, total) after each batch."""
        seeds = options.seeds()
        for i in range(0, len(seeds), options.batch_size):
            chunk = seeds[i: i + options.batch_size]
            images = to_pixels(self.sample(chunk, cycle(cond, i, i + len(chunk)), options))
            if callback:
                callback(i + len(chunk), len(seeds))
            yield chunk, images

    def images(self, cond, options, callback=None):
        """All images at once, uint8 [N, S, S, 3], for a caller that needs them together (the report's features,
        the evaluator)."""
        out = [images for _, images in self.batches(cond, options, callback)]
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
