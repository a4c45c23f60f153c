"""Generating images from a checkpoint: rebuild the model, resolve the condition, run a sampler in batches.

Shared by sample.py, the quality report and fusion. Image i uses seed `seed + i`, so it is the same image whatever
--batch-size is.
"""
import sys

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .devices import autocast
from .errors import UserError
from .imageio import to_uint8
from .models import build_diffusion, build_gan, build_unet
from .samplers import guided, sample as run_sampler


DEFAULT_DDIM_STEPS = 100  # DDIM steps when --steps is not given


class DefaultN(int):
    """sample.py's --n default, marked so a mode can tell an explicit --n from none given (fusion makes one image
    per λ and the quality report 1,000 images unless --n is given). It is an ordinary int everywhere else."""


class Generator:
    """A loaded checkpoint ready to sample: `.images(seeds, cond)` → uint8 [B, H, W, 3]."""

    def __init__(self, ckpt_path, device, use_ema=True):
        ckpt = load_checkpoint(ckpt_path)
        self.ckpt, self.cfg, self.labels, self.device = ckpt, ckpt["run_config"], ckpt["labels"], device
        self.kind, self.step = ckpt["kind"], ckpt["step"]
        weights = "ema" if use_ema else ("model" if self.kind == "ddpm" else "generator")
        if self.kind == "ddpm":
            self.model = build_unet(self.cfg, self.labels)
            self.diffusion = build_diffusion(self.cfg)
        else:
            self.model, _ = build_gan(self.cfg, self.labels)
            self.diffusion = None
        try:
            self.model.load_state_dict(ckpt["models"][weights])
        except (KeyError, RuntimeError) as e:
            raise UserError(f"{ckpt_path}: its weights do not match its own config ({e.__class__.__name__}); "
                            "the file is damaged or was edited") from None
        self.model.to(device).eval()

    @property
    def image_size(self):
        return self.cfg.data.image_size

    # --- conditions ---------------------------------------------------------------------------------------------
    def parse_condition(self, classes=None, labels=None, n=1):
        """The condition tensor for n images: class indices [n] (cycling through `classes`) or multi-hot [n, K]."""
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
            return torch.tensor([idx[i % len(idx)] for i in range(n)], dtype=torch.long)
        # multi-label
        if classes:
            raise UserError("this model is conditioned on label sets; use --labels \"red cube, blue sphere\"")
        if not labels:
            raise UserError(f"this model needs --labels, e.g. --labels \"{names[0]}, {names[-1]}\"; known labels: "
                            f"{', '.join(names)}")
        vec = parse_label_text(labels, names)
        return torch.from_numpy(vec).float().unsqueeze(0).repeat(n, 1)

    # --- sampling -------------------------------------------------------------------------------------------------
    def model_fn(self, cond, cfg_scale):
        cond = None if cond is None else cond.to(self.device)
        return guided(self.model, cond, None, cfg_scale)

    @torch.no_grad()
    def sample(self, seeds, cond=None, sampler="ddim", steps=100, eta=0.0, cfg_scale=1.0, clip_x0=True,
               x_start=None, t_start=None, **solver_kw):
        """Float images [B, 3, S, S] in [−1, 1] for the given per-image seeds; solver_kw (spacing, churn) go to
        samplers.sample."""
        if self.kind == "dcgan":
            from .dcgan import sample_z

            z = sample_z(seeds, self.cfg.gan.z_dim).to(self.device)
            return self.model(z, None if cond is None else cond.to(self.device)).float()
        shape = (3, self.image_size, self.image_size)
        fn = self.model_fn(cond, cfg_scale)
        with autocast(self.device):
            return run_sampler(sampler, self.diffusion, fn, shape, seeds, self.device, steps, eta, clip_x0,
                               x_start, t_start, **solver_kw)

    def images(self, seeds, cond=None, batch_size=256, progress=None, **kw):
        """uint8 [N, S, S, 3], generated in batches; progress(done, total) after each batch."""
        out = []
        for i in range(0, len(seeds), batch_size):
            c = None if cond is None else cond[i: i + batch_size]
            out.append(to_uint8(self.sample(seeds[i: i + batch_size], c, **kw)))
            if progress:
                progress(i + len(out[-1]), len(seeds))
        return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)


def parse_label_text(text, names):
    """'red cube, blue sphere' → multi-hot float32 [K] over the model's vocabulary `names`."""
    from .shapes import parse_labels, VOCAB

    if list(names) != list(VOCAB):
        raise UserError("this checkpoint's label vocabulary differs from the shapes dataset's; retrain it")
    return parse_labels(text)
