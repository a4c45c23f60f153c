"""The solvers proven on data whose exact denoiser is known: Gaussian data N(μ, s²I), and single points.

For x0 ~ N(μ, S²) per pixel and x_t = α·x0 + σ·ε the posterior mean is closed form:
    E[x0 | x_t] = μ + α·S²/(α²S² + σ²)·(x_t − α·μ),   E[ε | x_t] = σ/(α²S² + σ²)·(x_t − α·μ).
In the VE variable x̃ = x/α with s = σ/α the probability-flow ODE dx̃/ds = (x̃ − D(x̃, s))/s has
D = μ + S²/(S² + s²)·(x̃ − μ), so x̃ − μ grows like √(S² + s²) and the ODE maps x̃(s_a) to
    x̃(s_b) = μ + √((S² + s_b²)/(S² + s_a²))·(x̃(s_a) − μ).
Every solver is compared with the exact solution at s = 0, the clean image:
    μ + S/√(S² + s_max²)·(x_T/α_max − μ),   s_max = s(t_start),
so a solver that stops early (returns D at a last level s_min > 0 instead of integrating down to 0) is measured:
D(s_min) shrinks towards μ by S/√(S² + s_min²) more than the ODE does. DDIM, Heun and Karras spacings visit t = 0
(s(0) ≈ 0.01) before the last step; DPM-Solver++ on diffusers' uniform grid stops at t ≈ t_start/(n + 1).
Between whole timesteps the model's noise level is log-linear in t (the samplers' convention), and so is the oracle's.
"""
import math

import numpy as np
import pytest
import torch

from tinyddpm import fusion, samplers
from tinyddpm.constants import SAMPLERS, SPACINGS
from tinyddpm.diffusion import Denoiser, GaussianDiffusion
from tinyddpm.errors import UserError
from tinyddpm.guidance import classifier_free
from tinyddpm.samplers import ImageNoise, SamplerOptions, ddim_invert, ddim_timesteps, levels, model_calls
from tinyddpm.schedules import get_betas

MU, S = 0.2, 0.5             # the Gaussian data: every pixel N(μ, S²), independent
SHAPE = (3, 4, 4)
T = 1000
ODE_SOLVERS = ("ddim", "dpmpp-2m", "heun")
SECOND_ORDER = ("dpmpp-2m", "heun")
# Model calls, in the asymptotic regime and above the error floor of stopping at s(0) ≈ 0.01 before the last step
# (about 6e-5 here); against s = 0 the second-order ratios measured 4.3–8.8, DDIM's 1.98–2.01.
ORDER_STEPS = (20, 40, 80)


def schedule_s(diff, t):
    """Noise level s(t) = √((1−ᾱ)/ᾱ), log-linear between whole timesteps; t: numpy array of floats."""
    ab = diff.np["alphas_cumprod"]
    return np.exp(np.interp(t, np.arange(len(ab)), 0.5 * np.log((1 - ab) / ab)))


def gaussian_oracle(diff, mu=MU, sd=S):
    """model_fn(x, t) returning the exact ε, x0 or v (the diffusion's objective) for N(μ, S²) data, float64."""
    def fn(x, t):
        s = torch.from_numpy(schedule_s(diff, t.double().cpu().numpy())).view(-1, 1, 1, 1)
        a = 1.0 / torch.sqrt(1.0 + s * s)
        sig = s * a
        r = x.double() - a * mu
        eps = sig / (a * a * sd ** 2 + sig * sig) * r
        x0 = mu + a * sd ** 2 / (a * a * sd ** 2 + sig * sig) * r
        return {"eps": eps, "x0": x0, "v": a * eps - sig * x0}[diff.objective]
    return fn


def point_oracle(diff, x0):
    """The exact ε for data that is the single point x0 [B, C, H, W] (any t, whole or fractional)."""
    def fn(x, t):
        s = torch.from_numpy(schedule_s(diff, t.double().cpu().numpy())).view(-1, 1, 1, 1).to(x.dtype)
        a = 1.0 / torch.sqrt(1.0 + s * s)
        return (x - a * x0) / (s * a)
    return fn


def exact_ode(diff, x_t, t_start):
    """The probability-flow ODE's solution at s = 0 from x_t at whole timestep t_start (VP x_t = α·x̃)."""
    s_max = schedule_s(diff, np.array([t_start]))[0]
    return MU + S / math.sqrt(S ** 2 + s_max ** 2) * (x_t * math.sqrt(1 + s_max ** 2) - MU)


def sample(name, diff, model, shape, seeds, steps=None, clip_x0=True, x_start=None, t_start=None, callback=None,
           **kw):
    """samplers.sample with the sampler's options spelled out (kw: eta, spacing, churn), noise per seed on the CPU."""
    options = SamplerOptions(name, steps, clip_x0=clip_x0, **kw)
    return samplers.sample(diff, model, options, ImageNoise(seeds, shape, "cpu"), x_start, t_start, callback)


def linear(objective="eps", timesteps=T):
    return GaussianDiffusion(get_betas("linear", timesteps), objective=objective)


def start(batch=16, seed=0):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ode_error(diff, name, steps, spacing, t_start):
    """RMS distance from the exact ODE solution at s = 0 (not at the solver's own last level)."""
    x_t = start()
    out = sample(name, diff, gaussian_oracle(diff), SHAPE, list(range(len(x_t))), steps, clip_x0=False,
                 x_start=x_t, t_start=t_start, spacing=spacing)
    return (out - exact_ode(diff, x_t, t_start)).pow(2).mean().sqrt().item()


# --- the ODE solvers converge to the exact probability-flow solution at their order --------------------------------
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("name,spacing", [("ddim", "uniform"), ("ddim", "karras"), ("dpmpp-2m", "karras"),
                                          ("heun", "karras"), ("heun", "uniform")])
def test_ode_solvers_converge_at_their_order(name, spacing, objective):
    diff = linear(objective)
    for t_start in (T - 1, 400):  # from pure noise, and from an intermediate step (fusion)
        errs = [ode_error(diff, name, n, spacing, t_start) for n in ORDER_STEPS]
        ratios = [errs[i] / errs[i + 1] for i in range(len(errs) - 1)]
        if name in SECOND_ORDER:
            assert min(ratios) >= 3.0, (errs, ratios)
        else:  # DDIM is first order: the error halves
            assert all(1.8 <= r <= 2.2 for r in ratios), (errs, ratios)
        assert errs[-1] < 0.02


def test_dpmpp_uniform_spacing_converges_and_beats_ddim():
    # diffusers' uniform grid keeps λ-steps of O(1) next to t = 0 however many levels there are, and its last step
    # to the clean image starts from t ≈ t_start/(n + 1), so the error against s = 0 does not fall at a steady
    # order (from t = 400 it rose from 20 to 40 calls); over 8× the calls it still falls far faster than first
    # order would (8×), and at equal model calls it is far ahead of DDIM.
    diff = linear()
    for t_start in (T - 1, 400):
        errs = [ode_error(diff, "dpmpp-2m", n, "uniform", t_start) for n in (10, 80)]
        assert errs[0] / errs[1] >= 16, errs
    for n in (20, 50):
        assert ode_error(diff, "dpmpp-2m", n, "uniform", T - 1) < ode_error(diff, "ddim", n, "uniform", T - 1) / 2


def test_second_order_beats_ddim_at_equal_model_calls():
    diff = linear()
    ddim = ode_error(diff, "ddim", 20, "uniform", T - 1)
    assert ode_error(diff, "dpmpp-2m", 20, "karras", T - 1) < ddim / 2
    # Heun spends two calls per level, so it pulls ahead at more calls (measured: 2.0× at 21, 4.7× at 49).
    assert ode_error(diff, "heun", 49, "uniform", T - 1) < ode_error(diff, "ddim", 50, "uniform", T - 1) / 2


@pytest.mark.parametrize("calls", [9, 19, 49])
def test_heun_integrates_down_to_t_0(calls):
    """Its last level is t = 0 (σ ≈ 0.01), then one Euler step to σ = 0, as EDM's Algorithm 2 ends at σ_min: on
    diffusers' grid it stopped at t = 84 for 19 calls from noise and returned the blurred x0 prediction there."""
    diff = linear()
    for spacing in SPACINGS:
        t, s = levels(SamplerOptions("heun", calls, spacing=spacing), diff)
        assert t[-1] == 0 and len(t) == (calls + 1) // 2 and np.all(np.diff(t) < 0)


def test_cosine_schedule_converges_too():
    diff = GaussianDiffusion(get_betas("cosine", T))
    for name, spacing in (("dpmpp-2m", "karras"), ("heun", "uniform"), ("heun", "karras")):
        errs = [ode_error(diff, name, n, spacing, 400) for n in ORDER_STEPS]
        assert errs[0] / errs[1] >= 3.0 and errs[1] / errs[2] >= 3.0, errs


def test_heun_from_noise_starts_at_edm_sigma_max():
    # The cosine schedule's s(T−1) is about 2e4; Heun's linear steps in s need EDM's σ_max = 80 (the signal at
    # s = 80 is 1/80 of the noise). From pure noise the first level is the whole step just below it.
    diff = GaussianDiffusion(get_betas("cosine", T))
    t, s = levels(SamplerOptions("heun", 41, spacing="karras"), diff)
    assert s[0] <= samplers.HEUN_S_MAX < diff.sigma(t[0] + 1) and t[-1] == 0
    z = start()
    out = sample("heun", diff, gaussian_oracle(diff), SHAPE, list(range(len(z))), steps=41,
                 spacing="karras", clip_x0=False, x_start=None)
    noise = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(len(z))])
    assert (out - exact_ode(diff, noise.double(), t[0])).pow(2).mean().sqrt() < 0.03   # 4.9 from s(T−1) at 10 calls


# --- the SDE solvers (and Heun with churn) reproduce the data's mean and variance ------------------------------------
@pytest.mark.parametrize("name,steps,kw", [("dpmpp-2m-sde", 100, dict(spacing="karras")), ("dpmpp-2m-sde", 200, {}),
                                           ("heun", 199, dict(churn=40.0))])
def test_stochastic_samplers_reproduce_the_data_distribution(name, steps, kw):
    diff = linear()
    n = 1000
    out = sample(name, diff, gaussian_oracle(diff), SHAPE, list(range(n)), steps=steps, clip_x0=False, **kw)
    vals = out.double().flatten()
    m = vals.numel()  # 48,000 independent N(μ, S²) values if the sampler is right
    # 5 standard errors of the sample mean and variance, plus 1 % of S² for the discretisation (measured: ≤ 0.5 %).
    assert abs(vals.mean().item() - MU) < 5 * S / math.sqrt(m)
    assert abs(vals.var().item() - S ** 2) < 5 * S ** 2 * math.sqrt(2 / m) + 0.01 * S ** 2


def test_sde_is_not_the_ode():
    diff = linear()
    seeds = list(range(8))
    ode = sample("dpmpp-2m", diff, gaussian_oracle(diff), SHAPE, seeds, steps=20, clip_x0=False)
    sde = sample("dpmpp-2m-sde", diff, gaussian_oracle(diff), SHAPE, seeds, steps=20, clip_x0=False)
    assert (ode - sde).abs().mean() > 0.1


# --- what every solver shares: seeds, starts, clipping, progress, model calls --------------------------------------
ALL_KW = [("ddim", dict(eta=1.0)), ("dpmpp-2m", {}), ("dpmpp-2m-sde", {}), ("heun", dict(churn=40.0)),
          ("dpmpp-2m-sde", dict(spacing="karras")), ("ddpm", {})]


@pytest.mark.parametrize("name,kw", ALL_KW)
def test_per_image_seeds_independent_of_batch(name, kw):
    diff = linear(timesteps=100)
    model = lambda x, t: 0.5 * torch.tanh(x) + 1e-3 * t.view(-1, 1, 1, 1).float()  # noqa: E731

    def run(seeds):
        return sample(name, diff, model, SHAPE, seeds, None if name == "ddpm" else 9, **kw)

    full = run([10, 11, 12, 13])
    assert torch.allclose(run([12]), full[2:3], atol=1e-5)
    assert torch.allclose(run([13, 10]), full[[3, 0]], atol=1e-5)
    assert not torch.allclose(full[0], full[1])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_solver_starts_at_t_and_lands_on_the_data(name, spacing):
    if name == "ddpm" and spacing == "karras":
        pytest.skip("ddpm visits every step")
    diff = linear(timesteps=100)
    x0 = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    seen = []
    oracle = point_oracle(diff, x0)

    def model(x, t):
        seen.append(t.double().max().item())
        return oracle(x, t)

    x_t = diff.q_sample(x0, torch.tensor([40, 40]), torch.randn(2, *SHAPE))
    steps = None if name == "ddpm" else 7
    out = sample(name, diff, model, SHAPE, [0, 1], steps, x_start=x_t, t_start=40, spacing=spacing)
    assert torch.allclose(out, x0, atol=1e-4)
    options = SamplerOptions(name, steps, spacing=spacing)
    visited = levels(options, diff, 40, from_noise=False)[0]
    assert seen[0] == 40 and max(seen) <= 40 and min(seen) == min(visited)
    assert len(seen) == model_calls(options, diff, 40, from_noise=False)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 100])
def test_model_calls_and_progress(name, steps):
    diff = linear(timesteps=60)
    calls, prog = [], []

    def model(x, t):
        calls.append(1)
        return 0.1 * x

    for spacing in ("uniform",) if name == "ddpm" else SPACINGS:
        calls.clear(), prog.clear()
        options = SamplerOptions(name, None if name == "ddpm" else steps, spacing=spacing)
        samplers.sample(diff, model, options, ImageNoise([0], SHAPE, "cpu"), callback=lambda d, n: prog.append((d, n)))
        want = model_calls(options, diff)
        assert len(calls) == want and prog[-1] == (want, want)
        assert want <= max(steps, 1) or name == "ddpm"
        if name == "heun":
            assert want % 2 == 1 and want >= steps - 1


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-sde", "heun"])
def test_clip_x0_keeps_the_prediction_in_range(name):
    # A model that predicts x0 far outside [−1, 1]: with clipping the result stays in range, without it it does not.
    diff = linear("x0", timesteps=100)
    wild = lambda x, t: torch.full_like(x, 3.0)  # noqa: E731
    assert sample(name, diff, wild, SHAPE, [0, 1], steps=6).abs().max() <= 1.0 + 1e-6
    assert sample(name, diff, wild, SHAPE, [0, 1], steps=6, clip_x0=False).abs().max() > 2.0


def test_karras_spacing():
    diff = linear()
    t, s = samplers.noise_levels(diff, 10, T - 1, spacing="karras")
    assert t[0] == T - 1 and t[-1] == 0 and np.all(np.diff(t) < 0)
    rho = samplers.KARRAS_RHO
    # s^(1/ρ) is evenly spaced (Karras et al. eq. 5) and the fractional t map back onto the same s.
    assert np.allclose(np.diff(s ** (1 / rho)), (s[-1] ** (1 / rho) - s[0] ** (1 / rho)) / 9)
    assert np.allclose(diff.sigma(diff.timestep(s)), s)
    assert np.array_equal(samplers.noise_levels(diff, 1, 300, "karras")[0], [300])
    assert np.array_equal(samplers.noise_levels(diff, 5, 0, "karras")[0], [0])


def test_float_timesteps_reach_the_unet():
    # The U-Net's sinusoidal embedding takes fractional t: Karras levels give it float timesteps.
    from tinyddpm.unet import timestep_embedding

    e = timestep_embedding(torch.tensor([10.0, 10.5, 11.0]), 32)
    assert not torch.allclose(e[1], e[0]) and not torch.allclose(e[1], e[2])
    diff = linear(timesteps=100)
    seen = []
    sample("dpmpp-2m", diff, lambda x, t: seen.append(t) or 0.1 * x, SHAPE, [0], steps=6, spacing="karras")
    assert seen[0].dtype == torch.long and any(t.is_floating_point() for t in seen)


@pytest.mark.parametrize("kw,says", [
    (dict(name="euler"), "--sampler must be one of"), (dict(steps=0), "--steps"), (dict(steps=-3), "--steps"),
    (dict(steps=201), "at most 200"), (dict(steps=2**62), "at most 200"), (dict(name="heun", steps=10**9), "at most"),
    (dict(name="ddpm", steps=5), "drop it"), (dict(t_start=100), "start"), (dict(t_start=-1), "start"),
    (dict(spacing="cosine"), "--spacing"), (dict(name="ddpm", steps=None, spacing="karras"), "every timestep"),
    (dict(eta=1.5), "--eta"), (dict(eta=-0.1), "--eta"), (dict(eta=float("nan")), "--eta"),
    (dict(name="heun", eta=1.0), "applies only to the ddim"), (dict(churn=1.0), "churn"),
    (dict(name="heun", churn=-1.0), "churn"),
])
def test_bad_requests_are_one_user_error_before_any_call(kw, says):
    diff = linear(timesteps=100)
    args = dict(name="ddim", steps=5)
    args.update(kw)
    name, calls = args.pop("name"), []
    with pytest.raises(UserError) as e:
        sample(name, diff, lambda x, t: calls.append(1) or x, SHAPE, [0], **args)
    assert says in str(e.value) and not calls


# --- the defects of issue 16 (each test fails on the code before the fix) -----------------------------------------
def test_defect1_one_step_starts_at_t_start():
    assert ddim_timesteps(T - 1, 1) == [T - 1]
    assert ddim_timesteps(500, 1) == [500]
    diff = linear(timesteps=100)
    x0 = torch.rand(2, *SHAPE) * 1.6 - 0.8
    seen = []
    oracle = point_oracle(diff, x0)

    def model(x, t):
        seen.append(int(t[0]))
        return oracle(x, t)

    # From pure noise: one call at T−1 (not at t = 0 on pure noise), which returns the data.
    assert torch.allclose(sample("ddim", diff, model, SHAPE, [0, 1], 1), x0, atol=1e-4) and seen == [99]
    # Fusion's start at t honours t with one step.
    seen.clear()
    x_t = diff.q_sample(x0, torch.tensor([30, 30]), torch.randn(2, *SHAPE))
    out = sample("ddim", diff, model, SHAPE, [0, 1], 1, x_start=x_t, t_start=30)
    assert seen == [30] and torch.allclose(out, x0, atol=1e-4)


def test_defect1_one_step_inversion_reaches_the_last_step():
    diff = linear(timesteps=100)
    x0, c = torch.rand(2, *SHAPE) * 1.6 - 0.8, 0.3
    denoise = Denoiser(diff, lambda x, t: torch.full_like(x, c), clip_x0=False)
    out = ddim_invert(denoise, x0, levels(SamplerOptions("ddim", 1), diff))
    ab = diff.np["alphas_cumprod"][-1]
    assert torch.allclose(out, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * c, atol=1e-4)


@pytest.mark.parametrize("eta", [1.5, 2.0, -0.5])
def test_defect2_ddim_refuses_eta_outside_0_1(eta):
    diff = linear(timesteps=100)
    with pytest.raises(UserError, match="--eta must be between 0.0 and 1.0"):
        sample("ddim", diff, lambda x, t: 0.1 * x, SHAPE, [0], 5, eta=eta)


@pytest.mark.parametrize("lam", [0.5, 0.25])
def test_defect3_independent_noise_has_the_noise_level_of_step_t(lam):
    diff = linear()
    t, n = 500, 4000
    zero = torch.zeros(*SHAPE)
    eps_a, eps_b = fusion.forward_noise(range(n), SHAPE, "independent")
    x_t = fusion.mix_noised(diff, (zero, zero), torch.full((n,), lam), t, (eps_a, eps_b), "independent")
    want = math.sqrt(1 - diff.np["alphas_cumprod"][t])
    assert abs(x_t.std().item() / want - 1) < 0.02   # 192,000 values: the std is known to 0.2 %
    shared = fusion.mix_noised(diff, (zero, zero), torch.full((n,), lam), t, (eps_a, eps_a), "shared")
    assert torch.allclose(shared, want * eps_a, atol=1e-6)


def test_defect5_slerp_antipodal_and_parallel():
    z = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        out = fusion.slerp(z, -z, alpha)
        assert torch.isfinite(out).all()
        assert abs(out.norm() / z.norm() - 1) < 1e-5              # on the sphere, never through 0
    assert torch.allclose(fusion.slerp(z, -z, 0.0), z) and torch.allclose(fusion.slerp(z, -z, 1.0), -z, atol=1e-5)
    assert torch.allclose(fusion.slerp(z, -2 * z, 0.5).norm(), 1.5 * z.norm())   # the norm interpolates
    near = -z + 1e-7 * torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    assert abs(fusion.slerp(z, near, 0.5).norm() / z.norm() - 1) < 1e-4
    assert torch.allclose(fusion.slerp(z, 2 * z, 0.5), 1.5 * z)     # parallel: the straight line
    assert torch.allclose(fusion.slerp(torch.zeros_like(z), z, 0.5), 0.5 * z)   # a zero latent: no NaN


def test_defect6_w0_is_exactly_the_unconditional_model_with_learned_variance():
    def model(x, t, cond=None, drop=None):
        # [B, 2C]: mean and variance halves both depend on the condition; dropped entries see the null condition.
        c = cond.float() * (~drop).float() if drop is not None else cond.float()
        c = c.view(-1, 1, 1, 1)
        return torch.cat([x + c, torch.tanh(c + 0.1 * x)], dim=1)

    x, t, cond = torch.randn(3, *SHAPE), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    uncond = model(x, t, cond, torch.ones(3, dtype=torch.bool))
    assert torch.equal(classifier_free(model, cond, 0.0)(x, t), uncond)
    calls = []
    classifier_free(lambda *a: calls.append(a[0].shape[0]) or model(*a), cond, 0.0)(x, t)
    assert calls == [3]   # one pass of B, not 2B


def test_learned_variance_model_samples_with_every_solver():
    diff = GaussianDiffusion(get_betas("linear", 100), learn_sigma=True)
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)  # noqa: E731
    for name in SAMPLERS:
        assert sample(name, diff, model, SHAPE, [0], None if name == "ddpm" else 4).shape == (1, *SHAPE)


def test_image_noise_draws_float32_on_the_device():
    z = ImageNoise([0, 1], SHAPE, "cpu").next()
    assert z.dtype == torch.float32 and z.shape == (2, *SHAPE)


def test_sampler_table_smoke(tmp_path, capsys):
    # benchmarks/sampler_table.py at toy size: a 1-step micro model, a stand-in feature network, every row.
    import importlib.util
    import json
    import os

    from tinyddpm import inception

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("sampler_table", os.path.join(root, "benchmarks", "sampler_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    real = inception.load_inception
    assert table.main(["--smoke", "--out", str(tmp_path), "--ddpm"]) == 0
    assert inception.load_inception is real   # the stand-in does not leak
    summary = json.loads((tmp_path / "sampler_table.json").read_text())
    rows = summary["rows"]
    assert len(rows) == len(table.VARIANTS) * 2 * len(table.SMOKE["calls"]) + 1
    assert {r["sampler"] for r in rows} == set(SAMPLERS) and all(r["fid"] >= 0 for r in rows)
    assert all(r["model_calls"] <= r["steps"] for r in rows if r["sampler"] != "ddpm")
    md = (tmp_path / "sampler_table.md").read_text()
    assert "| dpmpp-2m karras |" in md and "| ddpm (100 calls) |" in md and "seconds for 4 images" in md


def test_sampler_table_resumes_finished_rows(tmp_path):
    # A finished row is read back for the same key and measured again for any other key.
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("sampler_table", os.path.join(root, "benchmarks", "sampler_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    calls = []

    def compute():
        calls.append(1)
        return dict(fid=float(len(calls)))

    folder = str(tmp_path / "rows" / "ddim-uniform-10")
    os.makedirs(folder)
    assert table.cached_row(folder, dict(steps=10), compute) == dict(fid=1.0)
    assert table.cached_row(folder, dict(steps=10), compute) == dict(fid=1.0) and len(calls) == 1
    assert table.cached_row(folder, dict(steps=20), compute) == dict(fid=2.0) and len(calls) == 2
    (tmp_path / "rows" / "ddim-uniform-10" / "row.json").write_text("{torn")
    assert table.cached_row(folder, dict(steps=20), compute) == dict(fid=3.0)
