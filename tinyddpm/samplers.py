"""Samplers as plain functions (in the manner of EDM): DDPM ancestral, DDIM, and DDIM inversion.

`model_fn(x_t, t) -> output` is any callable: the EMA model, or `guided(...)` for classifier-free guidance.
Per-image seeds: image i draws all of its noise from its own generator seeded with seeds[i], so it is the same
image whatever the batch size or its position in the batch.
"""
import numpy as np
import torch


class ImageNoise:
    """One CPU torch.Generator per image; `next()` returns fresh N(0, I) noise [B, *shape] on `device`.

    CPU generators make the numbers identical on every device and torch build, which is what makes a sample
    reproducible from its seed alone.
    """

    def __init__(self, seeds, shape, device):
        self.shape, self.device = tuple(shape), device
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def next(self):
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return z.to(self.device, non_blocking=True)


def _timestep(step, batch, device):
    return torch.full((batch,), step, device=device, dtype=torch.long)


@torch.no_grad()
def ddpm_sample(diffusion, model_fn, shape, seeds, device, clip_x0=True, x_start=None, t_start=None, progress=None):
    """Ancestral sampling x_T → x_0 over every step (or from x_start at step t_start, for fusion).

    shape: (C, H, W); seeds: one int per image. Returns float [B, C, H, W] in about [−1, 1].
    """
    noise = ImageNoise(seeds, shape, device)
    x = noise.next() if x_start is None else x_start.to(device)
    first = diffusion.num_timesteps - 1 if t_start is None else t_start
    for i in range(first, -1, -1):
        t = _timestep(i, x.shape[0], device)
        p = diffusion.p_mean_variance(model_fn(x, t).float(), x, t, clip_x0)
        z = noise.next()
        # No noise is added on the last step (t = 0): the sample is the mean of p(x_0 | x_1).
        x = p["mean"] + (i > 0) * torch.exp(0.5 * p["log_var"]) * z
        if progress:
            progress(first - i + 1, first + 1)
    return x


def ddim_timesteps(num_timesteps, steps, t_start=None):
    """`steps` timesteps from t_start (default T−1) down to 0, evenly spaced and distinct."""
    first = num_timesteps - 1 if t_start is None else t_start
    steps = max(1, min(steps, first + 1))
    return np.unique(np.linspace(0, first, steps).round().astype(np.int64))[::-1].tolist()


@torch.no_grad()
def ddim_sample(diffusion, model_fn, shape, seeds, device, steps=50, eta=0.0, clip_x0=True,
                x_start=None, t_start=None, progress=None):
    """DDIM (Song et al. 2021) over `steps` timesteps; η = 0 is deterministic, η = 1 matches DDPM's variance.

    The last update goes from t = 0 to the clean image (ᾱ_prev = 1), so the output is the final x0 prediction.
    """
    noise = ImageNoise(seeds, shape, device)
    x = noise.next() if x_start is None else x_start.to(device)
    ts = ddim_timesteps(diffusion.num_timesteps, steps, t_start)
    ab = diffusion.np["alphas_cumprod"]
    for k, step in enumerate(ts):
        t = _timestep(step, x.shape[0], device)
        mean_out, _ = diffusion.split_output(model_fn(x, t).float(), x)
        x0, eps = diffusion.predict_x0_eps(mean_out, x, t, clip_x0)
        a_t = ab[step]
        a_prev = ab[ts[k + 1]] if k + 1 < len(ts) else 1.0
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if eta > 0 and k + 1 < len(ts):
            x = x + sigma * noise.next()
        if progress:
            progress(k + 1, len(ts))
    return x


@torch.no_grad()
def ddim_invert(diffusion, model_fn, x0, steps=50, progress=None):
    """Deterministic DDIM inversion: run the η = 0 update backwards, x_0 → x_T (no clipping, so it is invertible
    up to the discretisation error)."""
    ts = ddim_timesteps(diffusion.num_timesteps, steps)[::-1]  # ascending: 0 … T−1
    ab = diffusion.np["alphas_cumprod"]
    x = x0
    for k, step in enumerate(ts):
        # The reversed η = 0 step: ε is evaluated at the previous, less noisy point (t = 0 for the clean image,
        # whose ᾱ is 1), then x is moved along that ε to the next timestep.
        prev = ts[k - 1] if k > 0 else None
        t = _timestep(0 if prev is None else prev, x.shape[0], x.device)
        a_prev = 1.0 if prev is None else ab[prev]
        mean_out, _ = diffusion.split_output(model_fn(x, t).float(), x)
        _, eps = diffusion.predict_x0_eps(mean_out, x, t, clip_x0=False)
        x0_pred = (x - np.sqrt(1 - a_prev) * eps) / np.sqrt(a_prev)
        a_t = ab[step]
        x = np.sqrt(a_t) * x0_pred + np.sqrt(1 - a_t) * eps
        if progress:
            progress(k + 1, len(ts))
    return x


def guided(model, cond=None, drop=None, cfg_scale=1.0):
    """A model_fn for classifier-free guidance: out = out_uncond + w·(out_cond − out_uncond).

    w = 1 is the plain conditional model, w = 0 the unconditional one. Both passes run as one batch of 2B.
    With a learned variance, only the mean part is guided; the variance comes from the conditional pass (GLIDE).
    """
    if cond is None:
        return lambda x, t: model(x, t)
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond, drop)

    def fn(x, t):
        b = x.shape[0]
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]),
                     torch.cat([torch.zeros(b, dtype=torch.bool, device=x.device),
                                torch.ones(b, dtype=torch.bool, device=x.device)]))
        out_c, out_u = both[:b], both[b:]
        c = x.shape[1]
        mean = out_u[:, :c] + cfg_scale * (out_c[:, :c] - out_u[:, :c])
        return torch.cat([mean, out_c[:, c:]], dim=1)

    return fn


# --- one entry point for every caller (sample.py, fusion, the report, --eval-labels, training grids) -------------
SAMPLERS = ("ddim", "ddpm")


def sample(name, diffusion, model_fn, shape, seeds, device, steps=50, eta=0.0, clip_x0=True,
           x_start=None, t_start=None, progress=None):
    """Run the sampler called `name` (one of SAMPLERS); `steps` is ignored by "ddpm", which takes every step."""
    if name == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, seeds, device, clip_x0, x_start, t_start, progress)
    if name == "ddim":
        return ddim_sample(diffusion, model_fn, shape, seeds, device, steps, eta, clip_x0, x_start, t_start,
                           progress)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
