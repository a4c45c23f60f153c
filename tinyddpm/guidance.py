"""Guidance as wrappers of the network function `fn(x, t) -> output` that a diffusion.Denoiser calls: classifier-free
guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024), optionally only within an interval of noise
levels (Kynkäänniemi et al. 2024). A wrapped function looks like one network to the denoiser and to every sampler.

They mix the networks' outputs, whatever the objective (ε, x0 or v): the conversion to x0 is linear in the output,
so this equals mixing the x0 predictions, and the clip to [−1, 1] comes after the mix. Only the mean part of an
output is mixed; a learned variance (the second half of the channels) comes from the conditional / final network
(GLIDE). Both outputs are cast to float32 before they are mixed, as EDM2 does: under bf16 autocast (CUDA) the
network returns bf16, whose 8-bit mantissa would round the small difference that guidance amplifies.
"""
import torch


def _mix(base, target, w, channels):
    """base + w·(target − base) on the first `channels` channels (float32), the rest from target."""
    base, target = base.float(), target.float()
    mean = base[:, :channels] + w * (target[:, :channels] - base[:, :channels])
    return torch.cat([mean, target[:, channels:]], dim=1)


def classifier_free(model, cond=None, scale=1.0):
    """fn(x, t) of `model(x, t, cond, drop)` with classifier-free guidance: out_u + w·(out_c − out_u).

    cond: [B] class indices or [B, K] multi-hot rows, or None (an unconditional model: plain `model(x, t)`).
    w = 1 is the plain conditional model and w = 0 exactly the unconditional one (one pass with every condition
    dropped, so a learned variance is the unconditional one too). Otherwise both passes run as one batch of 2B.
    """
    if cond is None:
        return lambda x, t: model(x, t)
    if scale == 1.0:
        return lambda x, t: model(x, t, cond, None)
    if scale == 0.0:
        return lambda x, t: model(x, t, cond, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))

    def fn(x, t):
        b = x.shape[0]
        keep = torch.zeros(b, dtype=torch.bool, device=x.device)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), torch.cat([keep, ~keep]))
        return _mix(both[b:], both[:b], scale, x.shape[1])  # [B, C or 2C]: unconditional pushed towards conditional

    return fn


def autoguided(good, bad, w):
    """fn(x, t) of autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    out_bad + w·(out_good − out_bad), where `bad` is the same network earlier in its training (ema.Snapshot).

    Both are network functions (e.g. from `classifier_free`). Their difference points away from the errors the
    young model makes and the final one has partly outgrown. w = 1 is the good model alone."""
    if w == 1.0:
        return good

    def fn(x, t):
        out_good = good(x, t)
        return _mix(bad(x, t), out_good, w, x.shape[1])

    return fn


def limited(guided, plain, active):
    """fn(x, t): `guided` at the noise levels where active(t) [B] (bool) holds and `plain` (the unguided network)
    elsewhere: guidance applied in a limited interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited
    interval improves sample and distribution quality in diffusion models"). Outside it only one network runs.

    A sampler shows every image the same t, so one of the first two branches is taken; a batch that mixes levels
    gets each image's own choice."""
    def fn(x, t):
        on = active(t)
        if bool(on.all()):
            return guided(x, t)
        if not bool(on.any()):
            return plain(x, t).float()  # float32 like a guided output
        return torch.where(on.view(-1, *([1] * (x.dim() - 1))), guided(x, t), plain(x, t).float())

    return fn
