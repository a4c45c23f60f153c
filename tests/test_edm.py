"""EDM's formulation on the discrete VP schedule (Karras et al. 2022): the preconditioning's unit variances, the
log-normal training levels, the VP ↔ EDM noise-level mapping, and a run end to end."""
import math

import numpy as np
import pytest
import torch

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm.diffusion import EDM_LEVELS, GaussianDiffusion
from tinyddpm.schedules import get_betas

T = 1000
SIGMA_DATA = 0.5
LEVELS = (0.02, 0.1, 0.5, 1.0, 5.0, 50.0)  # VE noise levels across the schedule's range [0.01, 157]


def edm(levels=("uniform", *EDM_LEVELS[1:]), sigma_data=SIGMA_DATA, objective="edm"):
    return GaussianDiffusion(get_betas("linear", T), objective=objective, sigma_data=sigma_data, levels=levels)


def at_sigma(d, sigma, n):
    """Fractional timesteps [n] whose noise level is σ."""
    return torch.full((n,), float(d.timestep(sigma)), dtype=torch.float32)


@pytest.mark.parametrize("sigma", LEVELS)
def test_preconditioning_gives_unit_variance_inputs_and_targets(sigma):
    d, n = edm(), 200_000
    g = torch.Generator().manual_seed(0)
    x0 = SIGMA_DATA * torch.randn(n, 1, 1, 1, generator=g)  # data of std σ_data
    noise = torch.randn(n, 1, 1, 1, generator=g)
    t = at_sigma(d, sigma, n)
    x_t = d.q_sample(x0, t, noise)
    seen = []
    d.network(lambda x, tt: seen.append(x) or x, x_t, t)
    # 200,000 values: the variance is known to 0.6 % (5 standard errors of a variance: 5·√(2/n))
    assert abs(seen[0].var().item() - 1) < 5 * math.sqrt(2 / n), seen[0].var()
    assert abs(d.target(x0, t, noise, x_t).var().item() - 1) < 5 * math.sqrt(2 / n)


def test_an_exact_network_denoises_exactly_and_has_zero_loss():
    """A network that outputs the exact F for a single data point recovers it at any σ, whole or fractional t."""
    d = edm()
    x0 = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.6 - 0.8

    def exact(x_in, t):
        sigma = torch.from_numpy(d.sigma(t.double().numpy())).view(-1, 1, 1, 1)
        c_in, c_skip, c_out = d._edm(sigma)
        return (x0[: len(x_in)] - c_skip * x_in / c_in) / c_out

    for t in (0, 3, 250.5, 998.75):
        x_t = d.q_sample(x0, torch.full((3,), float(t), dtype=torch.float64), torch.randn(3, 3, 4, 4,
                                                                                         dtype=torch.float64))
        assert torch.allclose(d.denoise(exact, x_t, t, clip_x0=False), x0, atol=1e-5)
    t = torch.tensor([1, 500, 999])
    losses = d.training_losses(exact, x0, t, torch.randn(3, 3, 4, 4, dtype=torch.float64))
    assert losses["loss"].abs().max() < 1e-10


def test_lognormal_levels_have_edms_moments():
    d = edm(levels=EDM_LEVELS)
    t = d.sample_timesteps(1_000_000, "cpu", torch.Generator().manual_seed(2))
    assert t.is_floating_point() and t.min() >= 0 and t.max() <= T - 1
    log_sigma = d._sigma_at(t, torch.zeros(len(t), 1, 1, 1)).flatten().double().log()
    # ln σ ~ N(−1.2, 1.2²); the schedule's σ(0) = 0.01 clamps 0.2 % of the lower tail, which moves the mean and
    # std by < 0.003; the sampling error at 10⁶ draws is 0.0012.
    assert abs(log_sigma.mean().item() - EDM_LEVELS[1]) < 0.01
    assert abs(log_sigma.std().item() - EDM_LEVELS[2]) < 0.01
    assert log_sigma.min().item() >= math.log(d.sigma(0)) - 1e-5


def test_vp_and_edm_noise_levels_agree_with_the_schedule():
    d = edm()
    ab = d.np["alphas_cumprod"]
    whole = np.arange(T)
    assert np.allclose(d.sigma(whole), np.sqrt((1 - ab) / ab), rtol=1e-14, atol=0)
    assert np.allclose(d.timestep(d.sigma(whole)), whole, rtol=0, atol=1e-9)
    frac = np.linspace(0, T - 1, 4001)
    torch_sigma = d._sigma_at(torch.from_numpy(frac).float(), torch.zeros(len(frac), 1, 1, 1)).flatten().numpy()
    assert np.allclose(torch_sigma, d.sigma(frac), rtol=1e-5)  # float32 on the device, float64 in numpy
    # α = 1/√(1 + σ²) at whole t is √ᾱ: the fractional q_sample is the discrete one there.
    x0, noise, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0, 10, 500, 999])
    assert torch.allclose(d.q_sample(x0, t.float(), noise), d.q_sample(x0, t, noise), atol=1e-5)


def test_with_unit_sigma_data_edm_is_v_prediction():
    """σ_data = 1: c_skip·x̃ = α·x_t and c_out = σ_vp, so x0 = α·x_t + σ_vp·F is v's x0 with F = −v."""
    d_edm, d_v = edm(sigma_data=1.0), edm(objective="v")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for t in (7, 421.5):
        a = d_edm.denoise(lambda xi, tt: out, x, t, clip_x0=False)
        b = d_v.denoise(lambda xi, tt: -out, x, t, clip_x0=False)
        assert torch.allclose(a, b, atol=1e-12)


def test_an_edm_run_trains_and_samples(tmp_path, capsys, one_thread):
    data = make_image_folder(str(tmp_path / "imgs"))
    run = tmp_path / "edm"
    code, _, err = run_script(train, ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out",
                                      str(run), "--steps", "4", "--objective", "edm", "--train-levels", "lognormal",
                                      *MICRO_FLAGS], capsys)
    assert code == 0, err
    for flags in ([], ["--sampler", "ddpm"], ["--sampler", "heun", "--steps", "5"]):
        out = tmp_path / f"s{len(flags)}"
        code, stdout, err = run_script(sample, ["--ckpt", str(run), "--n", "2", "--out", str(out), "--device", "cpu",
                                                *flags], capsys)
        assert code == 0 and "wrote 2 images" in stdout, err


def test_learned_variance_does_not_combine_with_edm(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "imgs"))
    for flags in (["--objective", "edm"], ["--train-levels", "lognormal"]):
        code, _, err = run_script(train, ["--dataset", "folder", "--data-dir", data, "--out", str(tmp_path / "x"),
                                          "--steps", "2", "--learn-sigma", *flags, *MICRO_FLAGS], capsys)
        assert_user_error(code, err, "--learn-sigma")
        assert not (tmp_path / "x").exists()
