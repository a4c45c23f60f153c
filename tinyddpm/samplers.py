"""Samplers as plain functions (in the manner of EDM and k-diffusion): DDPM ancestral, DDIM (and its inversion),
DPM-Solver++(2M), SDE-DPM-Solver++(2M) and EDM's Heun — docs/samplers.md.

Every sampler has one signature:

    sampler(denoise, x, levels, noise, callback=None, <its own options>) -> x0 [B, C, H, W]

`denoise` is a diffusion.Denoiser: D(x, t), the model's x0 prediction at a (fractional) timestep t, with the
schedule's noise levels σ(t) (diffusion.py explains them). `x` [B, C, H, W] is the start: pure noise, or a noised
image (fusion). `levels` is the pair (t [n], σ [n]) of float64 arrays the sampler visits, from `levels()`.
`noise` is an ImageNoise: image i draws all of its noise from its own generator, seeded with seeds[i], so it is the
same image whatever the batch size or its position in the batch. `callback(done, total)` follows the model calls.
`sample()` is the one entry point for every caller: it checks a SamplerOptions, makes the levels and runs the
sampler it names.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .checks import check_values
from .constants import SAMPLERS, SPACINGS
from .diffusion import Denoiser, vp_coefficients
from .errors import UserError

KARRAS_RHO = 7.0                   # ρ of Karras et al. (2022): levels crowd towards low noise
HEUN_S_MAX = 80.0                  # EDM's σ_max: Heun from pure noise starts no higher (its steps in σ are linear)
MAX_CHURN_GAMMA = math.sqrt(2.0) - 1.0   # EDM's cap on γ: at most double the variance in one churn
DEFAULT_SAMPLER = "dpmpp-2m-sde"   # sample.py's sampler and model calls (docs/samplers.md: the best FID at ≤ 50
DEFAULT_STEPS = 50                 # calls on the README's cat model)
# The most model calls any sampler may be asked for: Heun's 2n − 1 calls over at most T levels. More would only
# repeat levels (uniform spacing) or crowd fractional ones between the trained timesteps.
MAX_CALLS_PER_TIMESTEP = 2


@dataclass(frozen=True)
class SamplerOptions:
    """Which sampler, and how: checked once (`check`), passed whole to `sample`."""
    name: str = field(default=DEFAULT_SAMPLER, metadata=dict(choices=SAMPLERS, flag="--sampler",
                                                             help="the sampler (SAMPLERS)"))
    # Model calls; None: DEFAULT_STEPS, or every timestep for ddpm (which takes no other count).
    steps: Optional[int] = field(default=None, metadata=dict(min=1, help="model calls"))
    # η > 1 would ask for more noise than the step has (σ² > 1 − ᾱ_prev): refused rather than silently clamped.
    eta: float = field(default=0.0, metadata=dict(min=0.0, max=1.0, help="DDIM η: 0 deterministic, 1 DDPM-like"))
    spacing: str = field(default="uniform", metadata=dict(choices=SPACINGS, help="the solvers' noise levels"))
    churn: float = field(default=0.0, metadata=dict(min=0.0, help="heun's S_churn"))
    clip_x0: bool = field(default=True, metadata=dict(flag="--no-clip", help="clip the predicted x0 to [-1, 1]"))

    def check(self, num_timesteps, t_start=None):
        """Every invalid request as one UserError naming its flag; returns self."""
        check_values(self)
        name, calls = self.name, self.steps
        if name == "ddpm" and calls is not None:
            raise UserError(f"the ddpm sampler takes every one of the model's {num_timesteps} timesteps, so --steps "
                            f"does not apply; drop it, or use --sampler ddim --steps {calls}")
        if calls is not None and calls > MAX_CALLS_PER_TIMESTEP * num_timesteps:
            raise UserError(f"--steps {calls} is more model calls than this model's {num_timesteps} timesteps can "
                            f"use; use at most {MAX_CALLS_PER_TIMESTEP * num_timesteps}")
        if t_start is not None and not (float(t_start).is_integer() and 0 <= t_start < num_timesteps):
            raise UserError(f"a sampler can start only at a timestep 0 … {num_timesteps - 1} of this model; "
                            f"got {t_start}")
        if name == "ddpm" and self.spacing != "uniform":
            raise UserError("the ddpm sampler visits every timestep; --spacing applies to ddim, dpmpp-2m, "
                            "dpmpp-2m-sde and heun")
        if name != "ddim" and self.eta:
            raise UserError(f"--eta applies only to the ddim sampler (dpmpp-2m-sde is stochastic with η = 1); "
                            f"drop it for {name}")
        if name != "heun" and self.churn:
            raise UserError(f"--churn applies only to the heun sampler; drop it for {name}")
        return self

    def calls(self):
        """The model-call budget asked for (DEFAULT_STEPS when none was given)."""
        return DEFAULT_STEPS if self.steps is None else self.steps


# DDIM at 100 steps: fusion and interpolation (whose figures and docs are deterministic DDIM's, and interpolation must
# invert exactly), and sample.py's --eta without --sampler.
DDIM = SamplerOptions("ddim", 100)


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


# --- noise levels: where a sampler evaluates the model ---------------------------------------------------------
def ddim_timesteps(first, steps):
    """`steps` whole timesteps from `first` down to 0, evenly spaced and distinct (at most first + 1). One step is
    [first]: a single jump from the start to the clean image."""
    steps = max(1, min(steps, first + 1))
    return np.unique(np.linspace(first, 0, steps).round().astype(np.int64))[::-1].tolist()


def noise_levels(diffusion, steps, first, spacing="uniform", include_zero=True):
    """(t [n], σ [n]) float64: timesteps from whole timestep `first` downwards and their noise levels.

    uniform, include_zero: `ddim_timesteps` (whole steps down to t = 0, n ≤ first + 1). uniform without
    include_zero: diffusers' "linspace" grid, the first n of n + 1 evenly spaced whole steps from `first` to 0 (the
    step to the clean image takes the place of t = 0). karras: σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) −
    σ_max^(1/ρ)))^ρ from σ(first) to σ(0), at fractional t (Karras et al. 2022, eq. 5).
    """
    if spacing == "uniform":
        t = np.asarray(ddim_timesteps(first, steps) if include_zero else
                       np.unique(np.linspace(first, 0, steps + 1)[:-1].round())[::-1], dtype=np.float64)
    else:  # karras (SamplerOptions allows no other)
        s_max, s_min = diffusion.sigma([first, 0]) ** (1.0 / KARRAS_RHO)
        ramp = np.linspace(0.0, 1.0, steps if first > 0 else 1)
        t = diffusion.timestep((s_max + ramp * (s_min - s_max)) ** KARRAS_RHO)
        t[-1], t[0] = 0.0, first  # exact ends, whatever the float rounding (one level: [first])
    return t, diffusion.sigma(t)


def levels(options, diffusion, t_start=None, from_noise=True):
    """The (t, σ) levels the sampler of `options` visits (docs/samplers.md, "what steps means").

    ddpm takes every whole timestep from t_start; DDIM and Heun keep a grid that reaches t = 0 (Heun's n levels cost
    2n − 1 calls, and from pure noise it starts at σ ≤ HEUN_S_MAX as EDM does); DPM-Solver++ takes diffusers' grid,
    whose last step to the clean image stands in for t = 0 (one call per level).
    """
    first = diffusion.num_timesteps - 1 if t_start is None else int(t_start)
    if options.name == "ddpm":
        t = np.arange(first, -1, -1, dtype=np.float64)
        return t, diffusion.sigma(t)
    calls = options.calls()
    if options.name == "heun":
        if from_noise and diffusion.sigma(first) > HEUN_S_MAX:
            first = int(diffusion.timestep(HEUN_S_MAX))
        calls = (calls + 1) // 2
    return noise_levels(diffusion, calls, first, options.spacing, include_zero=options.name in ("ddim", "heun"))


def model_calls(options, diffusion, t_start=None, from_noise=True):
    """How many times `sample(...)` calls the network function (its NFE; guidance with w ∉ {0, 1} runs each call as
    one batch of 2B). At most the steps asked for, except ddpm, which takes every step from t_start."""
    n = len(levels(options, diffusion, t_start, from_noise)[0])
    return 2 * n - 1 if options.name == "heun" else n


# --- the samplers ----------------------------------------------------------------------------------------------
@torch.no_grad()
def ddpm(denoise, x, levels, noise, callback=None):
    """Ancestral sampling over every whole timestep of `levels` (Ho et al. 2020): x_{t−1} ~ p(x_{t−1} | x_t)."""
    ts = levels[0]
    for k, t in enumerate(ts):
        mean, log_var = denoise.posterior(x, t)
        z = noise.next()
        # No noise is added on the last step (t = 0): the sample is the mean of p(x_0 | x_1).
        x = mean + bool(t > 0) * torch.exp(0.5 * log_var) * z
        if callback:
            callback(k + 1, len(ts))
    return x


@torch.no_grad()
def ddim(denoise, x, levels, noise, callback=None, eta=0.0):
    """DDIM (Song et al. 2021), one model call per level; η = 0 is deterministic, η = 1 matches DDPM's variance.

    The last update goes from t = 0 to the clean image (ᾱ_prev = 1), so the output is the final x0 prediction.
    """
    ts, ss = levels
    for k, (t, s) in enumerate(zip(ts, ss)):
        x0 = denoise(x, t)
        alpha, sigma_t = vp_coefficients(s)
        eps = (x - alpha * x0) / sigma_t  # ε consistent with the (possibly clipped) x0
        a_t = alpha ** 2
        a_prev = vp_coefficients(ss[k + 1])[0] ** 2 if k + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if eta > 0 and k + 1 < len(ts):
            x = x + sigma * noise.next()
        if callback:
            callback(k + 1, len(ts))
    return x


@torch.no_grad()
def ddim_invert(denoise, x, levels, callback=None):
    """Deterministic DDIM inversion, x_0 → x_T: the η = 0 update run backwards through `levels` (a decoder's levels,
    descending; walked here from t = 0 upwards). Unclipped denoise keeps it invertible up to the discretisation.

    Each step evaluates ε at the previous, less noisy point (the clean input itself at the first step, taken as
    noise-free: ᾱ = 1), then moves along that ε to the next level."""
    ts, ss = levels[0][::-1], levels[1][::-1]  # ascending: 0 … T−1
    for k, s in enumerate(ss):
        t_prev = ts[k - 1] if k > 0 else 0.0
        x0 = denoise(x, t_prev)
        alpha_prev, sigma_prev = vp_coefficients(float(denoise.sigma(t_prev)))
        eps = (x - alpha_prev * x0) / sigma_prev
        start = x if k == 0 else x0  # the first step leaves the clean input itself, not its x0 prediction
        alpha, sigma = vp_coefficients(s)
        x = alpha * start + sigma * eps
        if callback:
            callback(k + 1, len(ts))
    return x


@torch.no_grad()
def dpmpp_2m(denoise, x, levels, noise, callback=None, sde=False):
    """DPM-Solver++(2M) (Lu et al. 2022b), one model call per level; `sde=True`: SDE-DPM-Solver++(2M).

    Data prediction D (the x0 estimate) in λ = −log σ, step h = λ_next − λ:
        ODE: x' = (σ'/σ)·x − α'·(e^(−h) − 1)·D̂
        SDE: x' = (σ'/σ)·e^(−h)·x + α'·(1 − e^(−2h))·D̂ + σ'·√(1 − e^(−2h))·z      (η = 1, fresh noise z)
    (σ here the VP σ_vp, α' and σ' at the next level) with D̂ = D + (D − D_prev)/(2r), r = h_prev/h (the multistep
    midpoint correction; D̂ = D on the first step). The last step, to σ = 0, returns D (first order, as diffusers'
    lower_order_final). Formulas as in diffusers' DPMSolverMultistepScheduler and k-diffusion's sample_dpmpp_2m(_sde).
    """
    ts, ss = levels
    d_prev = h_prev = None
    for k, (t, s) in enumerate(zip(ts, ss)):
        d = denoise(x, t)
        if k + 1 == len(ts):
            x = d
        else:
            (_, sg), (a_next, sg_next) = vp_coefficients(s), vp_coefficients(ss[k + 1])
            h = math.log(s / ss[k + 1])
            d_hat = d if d_prev is None else d + (d - d_prev) * (h / (2.0 * h_prev))
            if sde:
                x = (sg_next / sg * math.exp(-h)) * x - (a_next * math.expm1(-2.0 * h)) * d_hat
                x = x + sg_next * math.sqrt(-math.expm1(-2.0 * h)) * noise.next()
            else:
                x = (sg_next / sg) * x - (a_next * math.expm1(-h)) * d_hat
            d_prev, h_prev = d, h
        if callback:
            callback(k + 1, len(ts))
    return x


@torch.no_grad()
def heun(denoise, x, levels, noise, callback=None, churn=0.0):
    """EDM's sampler (Karras et al. 2022, Algorithm 2): Heun's method on the probability-flow ODE
    dx̃/dσ = (x̃ − D(x̃, σ))/σ in the VE variable x̃ = x/α, with optional churn.

    n levels, the last at t = 0: a Heun step (2 calls) between consecutive levels, then one Euler step (1 call)
    from σ(0) to σ = 0, 2n − 1 calls in all. churn (EDM's S_churn): before each step the level is raised to
    σ̂ = (1 + γ)·σ, γ = min(churn/n, √2 − 1), by adding fresh noise of variance σ̂² − σ²; never above σ(T−1), the
    noisiest level the model was trained at (so the first step from T−1 is not churned).
    """
    ts, ss = levels
    n, calls = len(ts), 2 * len(ts) - 1
    s_top = float(denoise.sigma(denoise.num_timesteps - 1))
    gamma = min(churn / n, MAX_CHURN_GAMMA)

    def slope(xv, t, s):  # dx̃/dσ at x̃ = xv; the U-Net sees the VP input α·x̃
        return (xv - denoise(vp_coefficients(s)[0] * xv, t)) / s

    xv = x / vp_coefficients(ss[0])[0]
    for k, (t, s) in enumerate(zip(ts, ss)):
        s_hat = min(s * (1.0 + gamma), max(s, s_top))
        if s_hat > s:
            xv = xv + math.sqrt(s_hat ** 2 - s ** 2) * noise.next()
            t = float(denoise.timestep(s_hat))
        s_next = ss[k + 1] if k + 1 < n else 0.0
        d = slope(xv, t, s_hat)
        x_next = xv + (s_next - s_hat) * d
        if s_next > 0:
            x_next = xv + (s_next - s_hat) * 0.5 * (d + slope(x_next, ts[k + 1], s_next))
        xv = x_next
        if callback:
            callback(min(2 * k + 2, calls), calls)
    return xv


# --- one entry point for every caller (sample.py's modes, the report, fusion, the training grids) ---------------
def run_sampler(options, denoise, x, levels, noise, callback=None):
    """The sampler that `options.name` names, with its own options."""
    if options.name == "ddpm":
        return ddpm(denoise, x, levels, noise, callback)
    if options.name == "ddim":
        return ddim(denoise, x, levels, noise, callback, eta=options.eta)
    if options.name == "heun":
        return heun(denoise, x, levels, noise, callback, churn=options.churn)
    return dpmpp_2m(denoise, x, levels, noise, callback, sde=options.name == "dpmpp-2m-sde")


def sample(diffusion, model_fn, options, noise, x_start=None, t_start=None, callback=None):
    """Images float [B, C, H, W] from the network function `model_fn(x, t)` with the sampler `options`
    (SamplerOptions) describes: from pure noise (the first draw of `noise`, an ImageNoise), or from x_start, an image
    noised to whole timestep t_start (fusion). Raises UserError for a bad request (SamplerOptions.check)."""
    options.check(diffusion.num_timesteps, t_start)
    x = noise.next() if x_start is None else x_start.to(noise.device)
    lv = levels(options, diffusion, t_start, from_noise=x_start is None)
    return run_sampler(options, Denoiser(diffusion, model_fn, options.clip_x0), x, lv, noise, callback)
