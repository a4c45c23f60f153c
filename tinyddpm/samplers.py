"""Samplers as plain functions (in the manner of EDM): DDPM ancestral, DDIM (and its inversion), DPM-Solver++(2M),
SDE-DPM-Solver++(2M) and EDM's Heun — docs/samplers.md.

`model_fn(x_t, t) -> output` is any callable: the EMA model, or `guided(...)` for classifier-free guidance.
Per-image seeds: image i draws all of its noise from its own generator seeded with seeds[i], so it is the same
image whatever the batch size or its position in the batch.

Noise levels. Besides the VP view (x_t = α·x0 + σ·ε, α = √ᾱ, σ = √(1−ᾱ)) the solvers use the VE noise level
s = σ/α = √((1−ᾱ)/ᾱ) of EDM and k-diffusion, and λ = −log s (half the log SNR) of DPM-Solver. The model is trained
at whole timesteps t = 0 … T−1; between them log s is interpolated linearly in t (k-diffusion's DiscreteSchedule),
so a solver may visit any s in [s(0), s(T−1)] and show the U-Net the matching fractional t (its sinusoidal time
embedding takes float t). Every solver visits the levels of `solver_levels(...)` from t_start downwards and then
takes a last step to s = 0, which returns the model's x0 prediction at the last level.
"""
import math

import numpy as np
import torch

SPACINGS = ("uniform", "karras")   # whole timesteps evenly spaced in t, or Karras et al.'s σ spacing
KARRAS_RHO = 7.0                   # ρ of Karras et al. (2022): levels crowd towards low noise
HEUN_S_MAX = 80.0                  # EDM's σ_max: Heun from pure noise starts no higher (its steps in s are linear)
MAX_CHURN_GAMMA = math.sqrt(2.0) - 1.0   # EDM's cap on γ: at most double the variance in one churn


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


def _start(noise, x_start, device):
    return noise.next() if x_start is None else x_start.to(device)


@torch.no_grad()
def ddpm_sample(diffusion, model_fn, shape, seeds, device, clip_x0=True, x_start=None, t_start=None, progress=None):
    """Ancestral sampling x_T → x_0 over every step (or from x_start at step t_start, for fusion).

    shape: (C, H, W); seeds: one int per image. Returns float [B, C, H, W] in about [−1, 1].
    """
    noise = ImageNoise(seeds, shape, device)
    x = _start(noise, x_start, device)
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


# --- noise levels: where a solver evaluates the model --------------------------------------------------------------
def ddim_timesteps(num_timesteps, steps, t_start=None):
    """`steps` whole timesteps from t_start (default T−1) down to 0, evenly spaced and distinct (at most t_start + 1).
    One step is [t_start]: a single jump from the start to the clean image."""
    first = num_timesteps - 1 if t_start is None else t_start
    steps = max(1, min(steps, first + 1))
    return np.unique(np.linspace(first, 0, steps).round().astype(np.int64))[::-1].tolist()


def _log_s(diffusion):
    """log s(t) at t = 0 … T−1 [T], increasing in t."""
    ab = diffusion.np["alphas_cumprod"]
    return 0.5 * (np.log1p(-ab) - np.log(ab))


def t_to_s(diffusion, t):
    """VE noise level s at (fractional) timesteps t: log s interpolated linearly between whole steps."""
    log_s = _log_s(diffusion)
    return np.exp(np.interp(t, np.arange(len(log_s)), log_s))


def s_to_t(diffusion, s):
    """The (fractional) timestep whose noise level is s, clamped to [0, T−1] (k-diffusion's sigma_to_t)."""
    log_s = _log_s(diffusion)
    return np.interp(np.log(s), log_s, np.arange(len(log_s), dtype=np.float64))


def noise_levels(diffusion, steps, t_start=None, spacing="uniform", include_zero=True):
    """(t [n], s [n]) float64: timesteps from t_start (default T−1) downwards and their noise levels s.

    uniform, include_zero: `ddim_timesteps` (whole steps down to t = 0, n ≤ t_start + 1). uniform without
    include_zero: diffusers' "linspace" grid, the first n of n + 1 evenly spaced whole steps from t_start to 0 (the
    step to the clean image takes the place of t = 0). karras: s_i = (s_max^(1/ρ) + i/(n−1)·(s_min^(1/ρ) −
    s_max^(1/ρ)))^ρ from s(t_start) to s(0), at fractional t (Karras et al. 2022, eq. 5).
    """
    first = diffusion.num_timesteps - 1 if t_start is None else t_start
    if spacing == "uniform":
        t = np.asarray(ddim_timesteps(diffusion.num_timesteps, steps, first) if include_zero else
                       np.unique(np.linspace(first, 0, steps + 1)[:-1].round())[::-1], dtype=np.float64)
    elif spacing == "karras":
        s_max, s_min = t_to_s(diffusion, [first, 0]) ** (1.0 / KARRAS_RHO)
        ramp = np.linspace(0.0, 1.0, steps if first > 0 else 1)
        t = s_to_t(diffusion, (s_max + ramp * (s_min - s_max)) ** KARRAS_RHO)
        t[-1], t[0] = 0.0, first  # exact ends, whatever the float rounding (one level: [first])
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return t, t_to_s(diffusion, t)


def solver_levels(name, diffusion, steps, t_start=None, spacing="uniform", from_noise=True):
    """The (t, s) levels sampler `name` visits with `steps` model calls (docs/samplers.md, "what steps means").

    DDIM keeps its grid down to t = 0 (one call per level); DPM-Solver++ takes diffusers' grid (one call per
    level); Heun's n levels cost 2n − 1 calls, and from pure noise it starts at s ≤ HEUN_S_MAX as EDM does.
    """
    if name == "ddim":
        return noise_levels(diffusion, steps, t_start, spacing)
    first = diffusion.num_timesteps - 1 if t_start is None else t_start
    if name == "heun":
        if from_noise and t_to_s(diffusion, first) > HEUN_S_MAX:
            first = int(s_to_t(diffusion, HEUN_S_MAX))
        steps = (steps + 1) // 2
    return noise_levels(diffusion, steps, first, spacing, include_zero=False)


def _vp(s):
    """(α, σ) of the VP process at VE noise level s (s = 0: the clean image, (1, 0))."""
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return alpha, s * alpha


def denoise(diffusion, model_fn, x, t, s, clip_x0):
    """The model's x0 prediction [B, C, H, W] for x [B, C, H, W] at timestep t (float) with noise level s.

    The output is converted with the continuous (α, σ) of s, so fractional t works for ε, x0 and v models alike;
    whole t get a long tensor, as in training. A learned variance is ignored: these solvers only need the mean.
    """
    alpha, sigma = _vp(s)
    tt = torch.full((x.shape[0],), t, device=x.device,
                    dtype=torch.long if float(t).is_integer() else torch.float32)
    out, _ = diffusion.split_output(model_fn(x, tt), x)
    out = out.to(x.dtype)  # float32 from a bf16 autocast pass; float64 stays float64 (the analytic tests)
    if diffusion.objective == "eps":
        x0 = (x - sigma * out) / alpha
    elif diffusion.objective == "v":
        x0 = alpha * x - sigma * out
    else:
        x0 = out
    return x0.clamp(-1.0, 1.0) if clip_x0 else x0


# --- first order: DDIM -----------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(diffusion, model_fn, shape, seeds, device, steps=50, eta=0.0, clip_x0=True,
                x_start=None, t_start=None, progress=None, spacing="uniform"):
    """DDIM (Song et al. 2021), one model call per noise level; η = 0 is deterministic, η = 1 matches DDPM's
    variance. η > 1 would need more noise than the step has (σ² > 1 − ᾱ_prev), so it is refused.

    The last update goes from t = 0 to the clean image (ᾱ_prev = 1), so the output is the final x0 prediction.
    """
    _check_eta(eta)
    noise = ImageNoise(seeds, shape, device)
    x = _start(noise, x_start, device)
    ts, ss = solver_levels("ddim", diffusion, steps, t_start, spacing)
    for k, (t, s) in enumerate(zip(ts, ss)):
        x0 = denoise(diffusion, model_fn, x, t, s, clip_x0)
        alpha, sigma_t = _vp(s)
        eps = (x - alpha * x0) / sigma_t  # ε consistent with the (possibly clipped) x0
        a_t = alpha ** 2
        a_prev = _vp(ss[k + 1])[0] ** 2 if k + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
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


# --- second order: DPM-Solver++(2M), its SDE variant, EDM's Heun ---------------------------------------------------
@torch.no_grad()
def dpmpp_2m_sample(diffusion, model_fn, shape, seeds, device, steps=20, clip_x0=True, x_start=None, t_start=None,
                    progress=None, spacing="uniform", sde=False):
    """DPM-Solver++(2M) (Lu et al. 2022b), one model call per noise level; `sde=True`: SDE-DPM-Solver++(2M).

    Data prediction D (the x0 estimate, clipped with clip_x0) in λ = −log s, step h = λ_next − λ:
        ODE: x' = (σ'/σ)·x − α'·(e^(−h) − 1)·D̂
        SDE: x' = (σ'/σ)·e^(−h)·x + α'·(1 − e^(−2h))·D̂ + σ'·√(1 − e^(−2h))·z      (η = 1, fresh noise z)
    with D̂ = D + (D − D_prev)/(2r), r = h_prev/h (the multistep midpoint correction; D̂ = D on the first step). The
    last step, to s = 0, returns D (first order, as diffusers' lower_order_final). Formulas as in diffusers'
    DPMSolverMultistepScheduler and k-diffusion's sample_dpmpp_2m / sample_dpmpp_2m_sde.
    """
    noise = ImageNoise(seeds, shape, device)
    x = _start(noise, x_start, device)
    ts, ss = solver_levels("dpmpp-2m", diffusion, steps, t_start, spacing)
    d_prev = h_prev = None
    for k, (t, s) in enumerate(zip(ts, ss)):
        d = denoise(diffusion, model_fn, x, t, s, clip_x0)
        if k + 1 == len(ts):
            x = d
        else:
            (_, sg), (a_next, sg_next) = _vp(s), _vp(ss[k + 1])
            h = math.log(s / ss[k + 1])
            d_hat = d if d_prev is None else d + (d - d_prev) * (h / (2.0 * h_prev))
            if sde:
                x = (sg_next / sg * math.exp(-h)) * x - (a_next * math.expm1(-2.0 * h)) * d_hat
                x = x + sg_next * math.sqrt(-math.expm1(-2.0 * h)) * noise.next()
            else:
                x = (sg_next / sg) * x - (a_next * math.expm1(-h)) * d_hat
            d_prev, h_prev = d, h
        if progress:
            progress(k + 1, len(ts))
    return x


@torch.no_grad()
def heun_sample(diffusion, model_fn, shape, seeds, device, steps=19, clip_x0=True, x_start=None, t_start=None,
                progress=None, spacing="uniform", churn=0.0):
    """EDM's sampler (Karras et al. 2022, Algorithm 2): Heun's method on the probability-flow ODE
    dx̃/ds = (x̃ − D(x̃, s))/s in the VE variable x̃ = x/α, with optional churn.

    `steps` model calls buy n = (steps + 1) // 2 noise levels: a Heun step (2 calls) between levels, then one Euler
    step (1 call) to s = 0, 2n − 1 calls in all. churn (EDM's S_churn): before each step the level is raised to
    ŝ = (1 + γ)·s, γ = min(churn/n, √2 − 1), by adding fresh noise of variance ŝ² − s²; never above s(T−1), the
    noisiest level the model was trained at (so the first step from T−1 is not churned).
    """
    _check_churn(churn)
    noise = ImageNoise(seeds, shape, device)
    x = _start(noise, x_start, device)
    ts, ss = solver_levels("heun", diffusion, steps, t_start, spacing, from_noise=x_start is None)
    n, calls, s_top = len(ts), 2 * len(ts) - 1, float(t_to_s(diffusion, diffusion.num_timesteps - 1))
    gamma = min(churn / n, MAX_CHURN_GAMMA)

    def d_of(xv, t, s):  # dx̃/ds at x̃ = xv; the U-Net sees the VP input α·x̃
        return (xv - denoise(diffusion, model_fn, _vp(s)[0] * xv, t, s, clip_x0)) / s

    xv = x / _vp(ss[0])[0]
    for k, (t, s) in enumerate(zip(ts, ss)):
        s_hat = min(s * (1.0 + gamma), max(s, s_top))
        if s_hat > s:
            xv = xv + math.sqrt(s_hat ** 2 - s ** 2) * noise.next()
            t = float(s_to_t(diffusion, s_hat))
        s_next = ss[k + 1] if k + 1 < n else 0.0
        d = d_of(xv, t, s_hat)
        x_next = xv + (s_next - s_hat) * d
        if s_next > 0:
            x_next = xv + (s_next - s_hat) * 0.5 * (d + d_of(x_next, ts[k + 1], s_next))
        xv = x_next
        if progress:
            progress(min(2 * k + 2, calls), calls)
    return xv


def guided(model, cond=None, drop=None, cfg_scale=1.0):
    """A model_fn for classifier-free guidance: out = out_uncond + w·(out_cond − out_uncond).

    w = 1 is the plain conditional model and w = 0 exactly the unconditional one (one pass with every condition
    dropped, so a learned variance is the unconditional one too). Otherwise both passes run as one batch of 2B and
    only the mean part is guided; a learned variance comes from the conditional pass (GLIDE).
    """
    if cond is None:
        return lambda x, t: model(x, t)
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond, drop)
    if cfg_scale == 0.0:
        return lambda x, t: model(x, t, cond, torch.ones(x.shape[0], dtype=torch.bool, device=x.device))

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


def autoguided(good, bad, w):
    """A model_fn for autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    out = out_bad + w·(out_good − out_bad), where `bad` is the same network earlier in its training.

    Both are model_fns (e.g. from `guided`). The pair's difference points away from the errors the young model
    makes and the final one has partly outgrown. w = 1 is the good model alone. As in `guided`, only the mean part
    is pushed; a learned variance comes from the good model."""
    if w == 1.0:
        return good

    def fn(x, t):
        out_g, out_b = good(x, t), bad(x, t)
        c = x.shape[1]
        mean = out_b[:, :c] + w * (out_g[:, :c] - out_b[:, :c])
        return torch.cat([mean, out_g[:, c:]], dim=1)

    return fn


# --- one entry point for every caller (sample.py, fusion, the report, --eval-labels, training grids) -------------
SAMPLERS = ("ddim", "ddpm", "dpmpp-2m", "dpmpp-2m-sde", "heun")


def model_calls(name, diffusion, steps, t_start=None, spacing="uniform", from_noise=True):
    """How many times `sample(name, steps=steps, ...)` calls model_fn (its NFE; guidance with w ∉ {0, 1} runs each
    call as one batch of 2B). At most `steps`, except ddpm, which takes every step from t_start."""
    if name == "ddpm":
        return (diffusion.num_timesteps - 1 if t_start is None else t_start) + 1
    n = len(solver_levels(name, diffusion, steps, t_start, spacing, from_noise)[0])
    return 2 * n - 1 if name == "heun" else n


def check_options(name, num_timesteps, steps=50, eta=0.0, t_start=None, spacing="uniform", churn=0.0):
    """Every invalid request as one ValueError with a clear message (sample.py turns it into its one-line error)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps (model calls) must be a whole number ≥ 1; got {steps!r}")
    if t_start is not None and not (float(t_start).is_integer() and 0 <= t_start < num_timesteps):
        raise ValueError(f"a sampler can start only at a timestep 0 … {num_timesteps - 1} of this model; "
                         f"got t_start = {t_start}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if name == "ddpm" and spacing != "uniform":
        raise ValueError("the ddpm sampler visits every timestep; spacing applies to ddim, dpmpp-2m, dpmpp-2m-sde "
                         "and heun")
    if name == "ddim":
        _check_eta(eta)
    if name != "ddim" and eta:
        raise ValueError(f"η applies only to the ddim sampler (dpmpp-2m-sde is stochastic with η = 1); "
                         f"drop it for {name}")
    if name != "heun" and churn:
        raise ValueError(f"churn applies only to the heun sampler; drop it for {name}")
    _check_churn(churn)


def _check_eta(eta):
    if not 0.0 <= eta <= 1.0:  # also false for NaN
        raise ValueError(f"DDIM η must be in [0, 1] (0 deterministic, 1 DDPM-like); got {eta}")


def _check_churn(churn):
    if not churn >= 0:
        raise ValueError(f"churn must be ≥ 0 (0 is the deterministic ODE); got {churn}")


def sample(name, diffusion, model_fn, shape, seeds, device, steps=50, eta=0.0, clip_x0=True,
           x_start=None, t_start=None, progress=None, spacing="uniform", churn=0.0):
    """Run the sampler called `name` (one of SAMPLERS) with `steps` model calls (model_calls() says exactly how
    many: ddpm takes every step from t_start, heun an odd number, a uniform spacing at most t_start + 1).

    Returns float [B, C, H, W]. progress(done, total) after each step. Raises ValueError for a bad request
    (check_options).
    """
    check_options(name, diffusion.num_timesteps, steps, eta, t_start, spacing, churn)
    common = dict(clip_x0=clip_x0, x_start=x_start, t_start=None if t_start is None else int(t_start),
                  progress=progress)
    if name == "ddpm":
        return ddpm_sample(diffusion, model_fn, shape, seeds, device, **common)
    if name == "ddim":
        return ddim_sample(diffusion, model_fn, shape, seeds, device, steps, eta, spacing=spacing, **common)
    if name == "heun":
        return heun_sample(diffusion, model_fn, shape, seeds, device, steps, spacing=spacing, churn=churn, **common)
    return dpmpp_2m_sample(diffusion, model_fn, shape, seeds, device, steps, spacing=spacing,
                           sde=name == "dpmpp-2m-sde", **common)
