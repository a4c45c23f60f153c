"""The recipe's training pieces (docs/recipe.md): the cosine learning-rate decay, min-SNR-γ loss weighting, their
flags and checks, and the ablation driver's smoke run."""
import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from tests.helpers import run_script
from tinyddpm.config import RunConfig, TrainConfig
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.schedules import get_betas
from tinyddpm.training import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- learning rate ---------------------------------------------------------------------------------------------
def test_constant_lr_is_warmup_then_flat():
    t = TrainConfig(lr=1e-3, warmup=10, steps=100)
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(99, t) == pytest.approx(1e-3)


def test_cosine_lr_closed_form():
    t = TrainConfig(lr=1e-3, warmup=10, steps=110, lr_decay="cosine")
    assert lr_at(4, t) == pytest.approx(5e-4)           # warm-up is the same as constant
    assert lr_at(10, t) == pytest.approx(1e-3)          # decay starts at the peak
    assert lr_at(60, t) == pytest.approx(5e-4)          # half-way: cos(π/2) → half the peak
    assert lr_at(35, t) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, t) == pytest.approx(0.0, abs=1e-12)  # 0 at --steps
    lrs = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))    # monotone after the warm-up


def test_cosine_lr_without_warmup():
    t = TrainConfig(lr=2e-3, warmup=0, steps=4, lr_decay="cosine")
    assert lr_at(0, t) == pytest.approx(2e-3)
    assert lr_at(2, t) == pytest.approx(1e-3)


# --- min-SNR-γ --------------------------------------------------------------------------------------------------
def _diffusion(objective, gamma):
    return GaussianDiffusion(get_betas("linear", 1000), objective=objective, min_snr_gamma=gamma)


def test_min_snr_weights_closed_form():
    d = _diffusion("eps", 5.0)
    t = torch.tensor([0, 100, 500, 999])
    ab = np.cumprod(1 - get_betas("linear", 1000))[t.numpy()]
    snr = ab / (1 - ab)
    want = np.minimum(snr, 5.0) / snr
    got = d.loss_weight(t, torch.zeros(4, 3, 2, 2)).flatten().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[-1] == pytest.approx(1.0)  # very noisy steps (SNR < γ) keep weight 1
    assert got[0] < 1e-3                  # nearly clean steps are damped by γ/SNR


@pytest.mark.parametrize("t_value", [3, 150, 600, 990])
def test_min_snr_is_the_same_loss_for_every_objective(t_value):
    """In x0 terms every objective's weighted loss is min(SNR, γ)·‖x̂0 − x0‖² (Hang et al. eq. 9): the same
    prediction of x0, written as ε, x0 or v, must give the same min-SNR loss."""
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.full((2,), t_value)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)  # one imperfect model, the same for all three
    losses = {}
    for obj in ("eps", "x0", "v"):
        d = _diffusion(obj, 5.0)
        x_t = d.q_sample(x0, t, noise)
        out = {"eps": d.eps_from_x0(x_t, t, x0_hat), "x0": x0_hat, "v": d.v_from(x0_hat, t, d.eps_from_x0(
            x_t, t, x0_hat))}[obj]
        losses[obj] = d.training_losses(lambda xt, tt: out, x0, t, noise)["loss"]
    torch.testing.assert_close(losses["eps"], losses["x0"], rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(losses["v"], losses["x0"], rtol=2e-3, atol=1e-6)


def test_min_snr_off_is_plain_mse_and_mse_is_still_reported():
    torch.manual_seed(1)
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([1, 400, 998])
    model = lambda x, tt: 0.5 * x  # noqa: E731
    plain = _diffusion("eps", 0.0).training_losses(model, x0, t, noise)
    weighted = _diffusion("eps", 5.0).training_losses(model, x0, t, noise)
    torch.testing.assert_close(plain["loss"], plain["mse"])
    torch.testing.assert_close(weighted["mse"], plain["mse"])      # the logged MSE is unweighted in both
    assert weighted["loss"][0] < plain["loss"][0]                   # t = 1 (SNR ≫ 5) is damped
    assert weighted["loss"][2] == pytest.approx(plain["loss"][2].item(), rel=1e-5)  # t = 998: weight 1


def test_min_snr_reaches_the_training_loop(tmp_path, capsys):
    """A few real steps with both new flags: the stored config has them and the loss is finite."""
    from tests.helpers import MICRO_FLAGS, make_image_folder

    data = make_image_folder(tmp_path / "imgs", n=8)
    out = tmp_path / "run"
    code, _, err = run_script(train, ["--dataset", "folder", "--data-dir", str(data), "--image-size", "16",
                                      *MICRO_FLAGS, "--steps", "3", "--min-snr-gamma", "5", "--lr-decay", "cosine",
                                      "--out", str(out)], capsys)
    assert code == 0, err
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["config"]["diffusion"]["min_snr_gamma"] == 5.0
    assert ck["config"]["train"]["lr_decay"] == "cosine"


def test_old_checkpoint_config_gets_the_old_behaviour():
    """A config written before these fields existed rebuilds with them off (constant lr, plain MSE)."""
    d = RunConfig().to_dict()
    del d["diffusion"]["min_snr_gamma"], d["train"]["lr_decay"]
    cfg = RunConfig.from_dict(d)
    assert cfg.diffusion.min_snr_gamma == 0.0 and cfg.train.lr_decay == "constant"


@pytest.mark.parametrize("flags,words", [
    (["--lr-decay", "linear"], ["--lr-decay"]),
    (["--min-snr-gamma", "-1"], ["--min-snr-gamma"]),
    (["--min-snr-gamma", "nan"], ["--min-snr-gamma"]),
])
def test_bad_recipe_flags_are_one_line(tmp_path, capsys, flags, words):
    from tests.test_bad_inputs import assert_one_line_error, run_case

    code, _, err = run_case("train", ["--dataset", "shapes", "--preset", "tiny", "--out", str(tmp_path / "r"), *flags], capsys)
    assert_one_line_error(code, err, words)  # ours, or argparse's usage + one error line
    assert not (tmp_path / "r").exists()


def test_tiny_attends_at_its_coarsest_level_at_any_size():
    """tiny's attention follows the image size and --channel-mults (8 px at CIFAR's 32), so the README's 64-px folder
    command still builds; an explicit --attn-resolutions wins."""
    from tinyddpm.config import build_config, validate

    cases = [({}, (8,)), (dict(data=dict(image_size=64)), (16,)), (dict(unet=dict(channel_mults=(1, 1))), (16,)),
             (dict(unet=dict(attn_resolutions=())), ()), (dict(unet=dict(attn_resolutions=(16,))), (16,))]
    for overrides, want in cases:
        cfg = build_config("tiny", overrides)
        assert cfg.unet.attn_resolutions == want, overrides
        validate(cfg)  # the network it describes can be built
    assert build_config("small", dict(data=dict(image_size=64))).unet.attn_resolutions == (16,)  # others: as set


# --- the ablation driver ----------------------------------------------------------------------------------------
def test_recipe_ablation_smoke(tmp_path):
    """Two rows side by side through real train.py and sample.py --report processes; the table has both."""
    out = tmp_path / "abl"
    env = dict(os.environ, TINYDDPM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "recipe_ablation.py"), "--out", str(out),
                        "--smoke", "--rows", "baseline", "min-snr-5", "--jobs", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    md = (out / "recipe_ablation.md").read_text()
    assert "| baseline |" in md and "| min-snr-5 |" in md
    ck = torch.load(out / "runs" / "min-snr-5" / "ckpt.pt", weights_only=True)
    assert ck["config"]["diffusion"]["min_snr_gamma"] == 5.0


def _ablation_module():
    spec = importlib.util.spec_from_file_location("recipe_ablation", os.path.join(ROOT, "benchmarks",
                                                                                 "recipe_ablation.py"))
    abl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(abl)
    return abl


def test_recipe_ablation_bases():
    """--base picks the command the rows change: today's preset has no overrides; 'before' turns off what the first
    ablation added (attention, cosine decay), so that table's rows still reproduce."""
    abl = _ablation_module()
    for base, extra in (("preset", []), ("before", ["--attn-resolutions", "--lr-decay", "constant"])):
        args = abl.build_parser().parse_args(["--out", "x", "--base", base, "--steps", "8000", "--data-dir", "d"])
        flags, steps = abl.row_flags("lr-2e-3", args)
        assert flags == abl.MAIN + extra + ["--data-dir", "d", "--lr", "2e-3", "--steps", "8000"] and steps == 8000
    args = abl.build_parser().parse_args(["--out", "x", "--steps", "8000"])  # default: the published table's base
    assert abl.row_flags("batch-64", args)[0][:len(abl.BASES["before"])] == abl.BASES["before"]
    assert abl.row_flags("batch-64", args)[1] == 4000
    assert abl.row_flags("batch-16", args)[0][-4:] == ["--batch-size", "16", "--steps", "16000"]  # same images
    # the report: 'before' pins the first table's 20-call sampler; 'preset' is the README's report, no sampler flags
    for base, sampling in (("before", ["--sampler", "dpmpp-2m-sde", "--steps", "20"]), ("preset", [])):
        args = abl.build_parser().parse_args(["--out", "x", "--base", base])
        assert abl.commands("deep-4px", args)[1][-len(sampling) - 1:] == ["--report", *sampling]


@pytest.mark.parametrize("base", ["before", "preset"])
def test_every_ablation_row_builds_its_network(base):
    """Each row's train.py flags parse, pass the config checks and build a U-Net that runs one forward pass, so
    a typo or a width GroupNorm cannot split fails here and not an hour into a row (shift-16: 16 channels at
    32 px, 64 at 16 and 8 px)."""
    from tinyddpm.config import build_config, user_overrides
    from tinyddpm.models import build_unet

    abl = _ablation_module()
    args = abl.build_parser().parse_args(["--out", "x", "--base", base, "--steps", "8000"])
    for name in abl.ROWS:
        flags, _ = abl.row_flags(name, args)
        targs = train.build_parser().parse_args(flags)
        cfg = build_config(targs.preset, user_overrides(targs), model=targs.model)
        net = build_unet(cfg, {"kind": "none", "names": []}).eval()
        x = torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)
        with torch.no_grad():
            assert net(x, torch.zeros(1, dtype=torch.long)).shape == x.shape, name
    assert abl.row_flags("shift-16", args)[0][-8:] == ["--base-channels", "16", "--channel-mults", "1", "4", "4",
                                                       "--steps", "8000"]
