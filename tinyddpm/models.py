"""Building networks from a RunConfig and the label description, so a checkpoint alone rebuilds its model."""
from dataclasses import replace

import numpy as np
import torch

from . import dcgan, unet
from .diffusion import GaussianDiffusion
from .errors import UserError

IMAGE_CHANNELS = 3


def no_labels():
    return {"kind": "none", "names": []}


def grid_condition(label_info, n, device):
    """The grids' conditions: classes cycled [n], or held-out label sets [n, K] (generalisation, not memory)."""
    if label_info["kind"] == "class":
        return torch.arange(n, device=device) % len(label_info["names"])
    if label_info["kind"] == "multilabel":
        from .shapes import eval_label_sets, objects_to_multi_hot

        sets = eval_label_sets()
        return torch.from_numpy(np.stack([objects_to_multi_hot(sets[i % len(sets)]) for i in range(n)])).to(device)
    return None


def check_architecture(cfg):
    """The network's shape rules for cfg (config.validate calls this before anything is built or written)."""
    if cfg.model == "dcgan":
        dcgan.num_doublings(cfg.data.image_size)
    else:
        unet.check_config(cfg.unet, cfg.data.image_size)
        if cfg.train.guide_channels:
            try:
                unet.check_config(guide_config(cfg).unet, cfg.data.image_size)
            except UserError as e:
                raise UserError(f"the narrow guide network (--guide-channels {cfg.train.guide_channels}): {e}") \
                    from None


def build_unet(cfg, labels):
    """The diffusion U-Net; 2C output channels when the variance is learned."""
    out = IMAGE_CHANNELS * (2 if cfg.diffusion.learn_sigma else 1)
    return unet.UNet(cfg.unet, cfg.data.image_size, IMAGE_CHANNELS, out, labels["kind"], len(labels["names"]))


def guide_config(cfg):
    """The RunConfig of the autoguidance network: the model's own, or its narrower version (--guide-channels)."""
    if not cfg.train.guide_channels:
        return cfg
    return replace(cfg, unet=replace(cfg.unet, base_channels=cfg.train.guide_channels))


def build_guide(cfg, labels):
    """The network the autoguidance snapshot holds weights of (ema.Snapshot): a U-Net of guide_config(cfg)."""
    return build_unet(guide_config(cfg), labels)


def build_gan(cfg, labels):
    """(Generator, Discriminator) for a DCGAN run."""
    shape = (cfg.gan, cfg.data.image_size, IMAGE_CHANNELS, labels["kind"], len(labels["names"]))
    g, d = dcgan.Generator(*shape), dcgan.Discriminator(*shape)
    g.apply(dcgan.init_weights)
    d.apply(dcgan.init_weights)
    return g, d


def build_diffusion(cfg):
    return GaussianDiffusion.from_config(cfg.diffusion)
