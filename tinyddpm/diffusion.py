"""Gaussian diffusion (Ho et al. 2020) with the improvements of Nichol & Dhariwal (2021).

The object holds only the schedule; the network is passed to each call as `model_fn(x_t, t) -> output`, so the same
diffusion serves the raw model, its EMA copy, or a guided wrapper (tinyddpm/guidance.py).

Noise levels. Besides the VP view (x_t = α·x0 + σ_vp·ε, α = √ᾱ, σ_vp = √(1−ᾱ)) the samplers use the VE noise level
σ = σ_vp/α = √((1−ᾱ)/ᾱ) of EDM and k-diffusion. The model is trained at whole timesteps t = 0 … T−1; between them
log σ is interpolated linearly in t (k-diffusion's DiscreteSchedule), so a sampler may visit any σ in [σ(0), σ(T−1)]
and show the U-Net the matching fractional t (its sinusoidal time embedding takes float t). `sigma(t)` and
`timestep(σ)` convert; `denoise(model_fn, x, t)` is the one place a network output (ε, x0 or v) becomes an x0
prediction, and `Denoiser` is what every sampler is given.

EDM's formulation (Karras et al. 2022) fits this discrete VP schedule as two options. `objective="edm"` is their
preconditioning: the network sees c_in·x̃ (x̃ = x_t/α, unit variance for data of std σ_data at every σ) and
predicts F with x0 = c_skip·x̃ + c_out·F, so its target (x0 − c_skip·x̃)/c_out also has unit variance, and the
plain MSE on F is their loss weight λ(σ) = 1/c_out². `train_levels="lognormal"` draws each image's training noise
level from ln σ ~ N(P_mean, P_std²) (clamped to the schedule's [σ(0), σ(T−1)]) instead of a uniform whole t, and
shows the U-Net the matching fractional t, as the samplers do. (With σ_data = 1, EDM's preconditioning is exactly
v-prediction with F = −v.)

Shapes: x0, x_t, noise [B, C, H, W]; t [B], each image its own timestep: long 0 … T−1, or float (fractional) with
lognormal training levels. The model output is [B, C, H, W], or [B, 2C, H, W] with a learned variance (second
half: interpolation weight v ∈ [−1, 1]).
"""
import math

import numpy as np
import torch

from .schedules import get_betas

LOG2 = math.log(2.0)
OBJECTIVES = ("eps", "x0", "v", "edm")
TRAIN_LEVELS = ("uniform", "lognormal")
EDM_LEVELS = ("lognormal", -1.2, 1.2)  # (kind, P_mean, P_std): EDM's training distribution of ln σ for CIFAR-10


class GaussianDiffusion:
    def __init__(self, betas: np.ndarray, objective: str = "eps", learn_sigma: bool = False, vlb_weight: float = 1e-3,
                 min_snr_gamma: float = 0.0, sigma_data: float = 0.5, levels=("uniform", *EDM_LEVELS[1:])):
        assert objective in OBJECTIVES and levels[0] in TRAIN_LEVELS, (objective, levels)
        self.objective, self.learn_sigma, self.vlb_weight = objective, learn_sigma, vlb_weight
        self.min_snr_gamma, self.sigma_data, self.levels = min_snr_gamma, sigma_data, tuple(levels)
        betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = T = len(betas)
        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        # Posterior q(x_{t-1} | x_t, x0) = N(c0·x0 + ct·x_t, var). At t = 0 the variance is 0; its log is clipped
        # to the value at t = 1 so the log stays finite (Nichol & Dhariwal).
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        arrays = dict(
            betas=betas, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
            sqrt_ab=np.sqrt(ab), sqrt_1m_ab=np.sqrt(1.0 - ab),
            sqrt_recip_ab=np.sqrt(1.0 / ab), sqrt_recipm1_ab=np.sqrt(1.0 / ab - 1.0),
            post_var=post_var,
            post_log_var_clipped=np.log(np.append(post_var[1], post_var[1:])) if T > 1 else np.log(betas),
            post_c0=betas * np.sqrt(ab_prev) / (1.0 - ab),
            post_ct=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
            log_betas=np.log(betas),
            snr=ab / (1.0 - ab),
            log_sigma=0.5 * (np.log1p(-ab) - np.log(ab)),  # log σ(t) at t = 0 … T−1, increasing in t
            sigma=np.sqrt((1.0 - ab) / ab),
        )
        # float64 master copies (exact, for tests and the schedule) and float32 copies per device for the maths.
        self.np = arrays
        self._buffers = {}

    @classmethod
    def from_config(cls, dcfg):
        return cls(get_betas(dcfg.schedule, dcfg.timesteps), dcfg.objective, dcfg.learn_sigma, dcfg.vlb_weight,
                   dcfg.min_snr_gamma, dcfg.sigma_data, (dcfg.train_levels, dcfg.p_mean, dcfg.p_std))

    def _get(self, name, t, x):
        """Schedule value `name` at timesteps t [B], shaped [B, 1, 1, 1] to broadcast against x."""
        key = (name, x.device)
        if key not in self._buffers:
            self._buffers[key] = torch.tensor(self.np[name], dtype=torch.float32, device=x.device)
        return self._buffers[key][t].view(-1, *([1] * (x.dim() - 1)))

    def _sigma_at(self, t, x):
        """σ(t) [B, 1, 1, 1] float32 at whole (long) or fractional (float) timesteps t [B], as `sigma` interpolates."""
        if not t.is_floating_point():
            return self._get("sigma", t, x)
        log_sigma = self._get("log_sigma", torch.arange(self.num_timesteps, device=x.device), x).flatten()
        i = t.floor().long().clamp(0, max(0, self.num_timesteps - 2))
        frac = (t - i).float().view(-1, *([1] * (x.dim() - 1)))
        upper = (i + 1).clamp(max=self.num_timesteps - 1)
        return torch.exp(torch.lerp(log_sigma[i].view_as(frac), log_sigma[upper].view_as(frac), frac))

    def _edm(self, sigma):
        """EDM's (c_in, c_skip, c_out) at VE noise level σ (a tensor or a float): unit-variance input and target."""
        sd2 = self.sigma_data ** 2
        total = sigma * sigma + sd2
        return total ** -0.5, sd2 / total, sigma * self.sigma_data * total ** -0.5

    def network(self, model_fn, x_t, t):
        """model_fn's output at x_t [B, C, H, W] and timesteps t [B]; under EDM's preconditioning the network sees
        c_in·x̃ = c_in·x_t/α instead of x_t."""
        if self.objective != "edm":
            return model_fn(x_t, t)
        sigma = self._sigma_at(t, x_t)
        return model_fn(x_t * (self._edm(sigma)[0] * torch.sqrt(1.0 + sigma * sigma)), t)

    # --- forward process and parameterisations --------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (fractional t: with the interpolated σ(t), α = 1/√(1 + σ²))."""
        if t.is_floating_point():
            sigma = self._sigma_at(t, x0)
            return (x0 + sigma * noise) * torch.rsqrt(1.0 + sigma * sigma)
        return self._get("sqrt_ab", t, x0) * x0 + self._get("sqrt_1m_ab", t, x0) * noise

    def x0_from_eps(self, x_t, t, eps):
        return self._get("sqrt_recip_ab", t, x_t) * x_t - self._get("sqrt_recipm1_ab", t, x_t) * eps

    def eps_from_x0(self, x_t, t, x0):
        return (self._get("sqrt_recip_ab", t, x_t) * x_t - x0) / self._get("sqrt_recipm1_ab", t, x_t)

    def v_from(self, x0, t, eps):
        """v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022)."""
        return self._get("sqrt_ab", t, x0) * eps - self._get("sqrt_1m_ab", t, x0) * x0

    def x0_from_v(self, x_t, t, v):
        return self._get("sqrt_ab", t, x_t) * x_t - self._get("sqrt_1m_ab", t, x_t) * v

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = self._get("post_c0", t, x_t) * x0 + self._get("post_ct", t, x_t) * x_t
        return mean, self._get("post_var", t, x_t), self._get("post_log_var_clipped", t, x_t)

    # --- noise levels and the denoiser ------------------------------------------------------------------------
    def sigma(self, t):
        """VE noise level σ at (fractional) timesteps t, float64: log σ interpolated linearly between whole steps."""
        log_sigma = self.np["log_sigma"]
        return np.exp(np.interp(t, np.arange(len(log_sigma)), log_sigma))

    def timestep(self, sigma):
        """The (fractional) timestep whose noise level is σ, clamped to [0, T−1] (k-diffusion's sigma_to_t)."""
        log_sigma = self.np["log_sigma"]
        return np.interp(np.log(sigma), log_sigma, np.arange(len(log_sigma), dtype=np.float64))

    def denoise(self, model_fn, x, t, clip_x0=True):
        """The x0 prediction [B, C, H, W] of model_fn for x [B, C, H, W] at one (fractional) timestep t.

        The output is converted with the continuous (α, σ_vp) of σ(t), so fractional t works for ε, x0 and v models
        alike; a whole t is given to the network as a long tensor, as in training. A learned variance is ignored."""
        sigma = float(self.sigma(t))
        alpha, sigma_vp = vp_coefficients(sigma)
        tt = torch.full((x.shape[0],), t, device=x.device,
                        dtype=torch.long if float(t).is_integer() else torch.float32)
        c_in, c_skip, c_out = self._edm(sigma)
        x_in = x * (c_in / alpha) if self.objective == "edm" else x
        out, _ = self.split_output(model_fn(x_in, tt), x)
        out = out.to(x.dtype)  # float32 from a bf16 autocast pass; float64 stays float64 (the analytic tests)
        if self.objective == "eps":
            x0 = (x - sigma_vp * out) / alpha
        elif self.objective == "v":
            x0 = alpha * x - sigma_vp * out
        elif self.objective == "edm":
            x0 = c_skip * (x / alpha) + c_out * out
        else:
            x0 = out
        return x0.clamp(-1.0, 1.0) if clip_x0 else x0

    # --- the reverse process ----------------------------------------------------------------------------------
    def split_output(self, out, x_t):
        """Model output → (mean part [B, C, ...], variance part or None)."""
        if self.learn_sigma:
            return out[:, : x_t.shape[1]], out[:, x_t.shape[1]:]
        return out, None

    def predict_x0_eps(self, mean_out, x_t, t, clip_x0=False):
        """From the mean part of the output, the predicted x0 and ε (x0 optionally clipped to [−1, 1])."""
        if self.objective == "eps":
            x0 = self.x0_from_eps(x_t, t, mean_out)
        elif self.objective == "x0":
            x0 = mean_out
        elif self.objective == "v":
            x0 = self.x0_from_v(x_t, t, mean_out)
        else:
            sigma = self._sigma_at(t, x_t)
            _, c_skip, c_out = self._edm(sigma)
            x0 = c_skip * x_t * torch.sqrt(1.0 + sigma * sigma) + c_out * mean_out
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        # ε recomputed from the (possibly clipped) x0 keeps DDIM consistent with the clipping.
        eps = mean_out if (self.objective == "eps" and not clip_x0) else self.eps_from_x0(x_t, t, x0)
        return x0, eps

    def model_log_variance(self, var_out, x_t, t):
        """Learned: interpolate between log β_t and the clipped posterior log variance (Nichol & Dhariwal eq. 15).
        Fixed: the posterior variance ("fixed small")."""
        min_log = self._get("post_log_var_clipped", t, x_t)
        if var_out is None:
            return min_log.expand_as(x_t)
        max_log = self._get("log_betas", t, x_t)
        frac = (var_out + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, out, x_t, t, clip_x0=True):
        """Parameters of p(x_{t-1} | x_t) from a model output: dict(mean, log_var, x0, eps)."""
        mean_out, var_out = self.split_output(out, x_t)
        x0, eps = self.predict_x0_eps(mean_out, x_t, t, clip_x0)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return dict(mean=mean, log_var=self.model_log_variance(var_out, x_t, t), x0=x0, eps=eps)

    # --- training ---------------------------------------------------------------------------------------------
    def sample_timesteps(self, batch, device, generator=None):
        """One timestep per image (never one t for the whole batch): uniform whole t [B] long, or with lognormal
        levels ln σ ~ N(P_mean, P_std²) clamped to [σ(0), σ(T−1)], as fractional t [B] float."""
        kind, p_mean, p_std = self.levels
        if kind == "uniform":
            return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)
        log_sigma = p_mean + p_std * torch.randn(batch, device=device, generator=generator)
        table = torch.tensor(self.np["log_sigma"], dtype=torch.float32, device=device)
        log_sigma = log_sigma.clamp(table[0], table[-1])
        i = (torch.searchsorted(table, log_sigma) - 1).clamp(0, max(0, self.num_timesteps - 2))
        upper = (i + 1).clamp(max=self.num_timesteps - 1)
        step = (table[upper] - table[i]).clamp(min=torch.finfo(table.dtype).tiny)
        return (i + ((log_sigma - table[i]) / step).clamp(0.0, 1.0)).float()

    def loss_weight(self, t, x):
        """Min-SNR-γ weights [B, 1, 1, 1] (Hang et al. 2023, eq. 9 and appendix): in x0 terms every timestep counts
        with weight min(SNR_t, γ); ε and v targets already carry SNR_t and SNR_t + 1 of that, so they are divided
        out. Low-noise steps (huge SNR), which plain ε-MSE over-weights in x0 terms, stop dominating the gradient.
        (EDM's F target carries its own weight, λ(σ)·c_out² = 1.)"""
        snr = self._get("snr", t, x) if not t.is_floating_point() else self._sigma_at(t, x) ** -2
        capped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1.0), "edm": 1.0}[self.objective]

    def target(self, x0, t, noise, x_t):
        """What the network is trained to output at x_t: ε, x0, v = α·ε − σ_vp·x0, or EDM's (x0 − c_skip·x̃)/c_out."""
        if self.objective == "eps":
            return noise
        if self.objective == "x0":
            return x0
        if not t.is_floating_point() and self.objective == "v":
            return self.v_from(x0, t, noise)
        sigma = self._sigma_at(t, x0)
        if self.objective == "v":
            return (noise - sigma * x0) * torch.rsqrt(1.0 + sigma * sigma)
        _, c_skip, c_out = self._edm(sigma)
        return (x0 - c_skip * x_t * torch.sqrt(1.0 + sigma * sigma)) / c_out

    def training_losses(self, model_fn, x0, t, noise):
        """Per-image losses [B]: L_simple (MSE on the objective's target; min-SNR-γ weighted when γ > 0), plus
        λ·T·L_t with a learned variance.

        Hybrid loss (Nichol & Dhariwal): the VLB term sees the mean with a stop-gradient, so it trains only the
        variance. L_vlb = Σ_t L_t = T·E_t[L_t]; λ·L_vlb is therefore λ·T·L_t per sampled t (as improved-diffusion).
        """
        x_t = self.q_sample(x0, t, noise)
        out = self.network(model_fn, x_t, t)
        mean_out, var_out = self.split_output(out, x_t)
        sq = (mean_out.float() - self.target(x0, t, noise, x_t)).pow(2)
        dims = tuple(range(1, x0.dim()))
        mse = sq.mean(dim=dims)
        terms = dict(mse=mse, loss=(sq * self.loss_weight(t, x0)).mean(dim=dims) if self.min_snr_gamma > 0 else mse)
        if self.learn_sigma:
            frozen = torch.cat([mean_out.detach(), var_out], dim=1).float()
            vlb = self.vlb_term(frozen, x0, x_t, t)
            terms["vlb"] = vlb
            terms["loss"] = terms["loss"] + self.vlb_weight * self.num_timesteps * vlb
        return terms

    # --- the variational bound (bits per dimension) -------------------------------------------------------------
    def vlb_term(self, out, x0, x_t, t):
        """L_t in bits/dim per image [B]: KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t)) for t > 0, and the discretised
        Gaussian decoder NLL −log p(x0 | x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(out, x_t, t, clip_x0=False)
        dims = tuple(range(1, x0.dim()))
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_var"]).mean(dim=dims) / LOG2
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_var"]).mean(dim=dims) / LOG2
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x0):
        """KL(q(x_T | x0) ‖ N(0, I)) in bits/dim per image [B]: the (constant-in-θ) prior term."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean = self._get("sqrt_ab", t, x0) * x0
        log_var = torch.log(1.0 - self._get("alphas_cumprod", t, x0)).expand_as(x0)
        return normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0)).mean(dim=(1, 2, 3)) / LOG2

    @torch.no_grad()
    def bits_per_dim(self, model_fn, x0, generator=None):
        """The full VLB in bits/dim per image [B]: Σ_t L_t + L_prior, one model call per timestep (T calls)."""
        total = self.prior_bpd(x0)
        for step in reversed(range(self.num_timesteps)):
            t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            # Noise from `generator` (a CPU generator keeps the estimate reproducible on any device).
            noise = torch.randn(x0.shape, generator=generator,
                                device=generator.device if generator is not None else x0.device).to(x0.device)
            x_t = self.q_sample(x0, t, noise)
            total = total + self.vlb_term(self.network(model_fn, x_t, t).float(), x0, x_t, t)
        return total


def vp_coefficients(sigma):
    """(α, σ_vp) of the VP process at VE noise level σ (σ = 0: the clean image, (1, 0))."""
    alpha = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return alpha, sigma * alpha


class Denoiser:
    """What a sampler sees of a model: D(x, t), the x0 prediction at (fractional) timestep t, clipped to [−1, 1]
    unless clip_x0 is False, and the schedule's noise levels. One object for every sampler (tinyddpm/samplers.py);
    guidance wraps the network function before it gets here (tinyddpm/guidance.py)."""

    def __init__(self, diffusion, model_fn, clip_x0=True):
        self.diffusion, self.model_fn, self.clip_x0 = diffusion, model_fn, clip_x0

    def __call__(self, x, t):
        return self.diffusion.denoise(self.model_fn, x, t, self.clip_x0)

    def sigma(self, t):
        return self.diffusion.sigma(t)

    def timestep(self, sigma):
        return self.diffusion.timestep(sigma)

    @property
    def num_timesteps(self):
        return self.diffusion.num_timesteps

    def posterior(self, x, t):
        """(mean, log variance) of p(x_{t−1} | x_t) at whole timestep t (DDPM's ancestral step): the posterior of
        the (clipped) x0 prediction, with the model's learned variance when it has one."""
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = self.diffusion.network(self.model_fn, x, tt).float()
        p = self.diffusion.p_mean_variance(out, x, tt, self.clip_x0)
        return p["mean"], p["log_var"]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # The tanh approximation of Φ used by Ho et al. and improved-diffusion (kept so bits/dim match their numbers).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


PIXEL_BIN = 1.0 / 255.0   # half-width of one 8-bit level in [−1, 1] is 1/255
EDGE = 0.999              # x0 values beyond ±EDGE are the extreme bins, which take the whole tail
LOG_MIN = 1e-12


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data x ∈ [−1, 1] under N(means, e^{2·log_scales}) integrated over each pixel's bin."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + PIXEL_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - PIXEL_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_MIN))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_MIN))
    log_probs = torch.where(
        x < -EDGE, log_cdf_plus,
        torch.where(x > EDGE, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=LOG_MIN))))
    return log_probs
