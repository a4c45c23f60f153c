"""Post-hoc EMA (tinyddpm/posthoc_ema.py): the profile arithmetic in closed form, the tracked averages against the
weights they must give, a rebuilt average against one tracked directly, and train.py / sample.py with every refusal."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.integrate import quad

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.posthoc_ema import (FOLDER, MAX_SIGMA_REL, NAME, POOR_FIT, PowerEMA, beta, coefficients, gamma_of,
                                  overlap, rebuild, sigma_rel_of, stored_steps)
from tinyddpm.report import markdown


# --- the profiles -------------------------------------------------------------------------------------------------
def test_sigma_rel_and_gamma_are_inverse_and_match_the_paper():
    # EDM2 (Karras et al. 2024, §3.1): σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94.
    assert gamma_of(0.05) == pytest.approx(16.97, abs=5e-3) and gamma_of(0.10) == pytest.approx(6.94, abs=5e-3)
    assert sigma_rel_of(0.0) == pytest.approx(MAX_SIGMA_REL, rel=1e-15)  # γ = 0: the flat average
    for s in np.linspace(0.005, MAX_SIGMA_REL - 1e-4, 40):
        assert gamma_of(s) > 0 and sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-10)
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.3):
        with pytest.raises(ValueError):
            gamma_of(bad)


def test_overlap_is_the_integral_of_the_two_profiles():
    p = lambda t, g: lambda u: (g + 1) * u ** g / t ** (g + 1)  # noqa: E731  (each integrates to 1 on [0, t])
    for (ta, ga), (tb, gb) in [((1000, 5.0), (3000, 2.0)), ((3000, 16.97), (2500, 6.94)), ((700, 1.0), (700, 1.0))]:
        want = quad(lambda u: p(ta, ga)(u) * p(tb, gb)(u), 0, min(ta, tb), epsabs=0, epsrel=1e-12)[0]
        assert overlap(ta, ga, tb, gb) == pytest.approx(want, rel=1e-9)
        assert overlap(tb, gb, ta, ga) == overlap(ta, ga, tb, gb)


class Vector(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))


def test_tracked_average_weights_each_step_as_the_closed_form():
    # The parameter is the one-hot e_τ after step τ, so the average after T steps *is* its weights over the steps:
    # w_τ = (1 − β_τ) Π_{k>τ} β_k = (τ/T)^(γ+1) (1 − (1 − 1/τ)^(γ+1)), which is ∝ τ^γ up to O(1/τ).
    steps, sigma = 400, 0.1
    model, ema = Vector(steps), None
    for tau in range(1, steps + 1):
        with torch.no_grad():
            model.w.zero_()
            model.w[tau - 1] = 1.0
        ema = ema or PowerEMA(model, [sigma])
        ema.update(model, tau)
    got = ema.averages[0].w.double().numpy()
    g, tau = gamma_of(sigma), np.arange(1, steps + 1, dtype=np.float64)
    want = (tau / steps) ** (g + 1) * (1 - (1 - 1 / tau) ** (g + 1))
    np.testing.assert_allclose(got, want, atol=1e-6)      # fp32 averages
    assert got.sum() == pytest.approx(1.0, abs=1e-5)
    mean = (got * tau).sum()
    std = np.sqrt((got * tau ** 2).sum() - mean ** 2)
    assert std / steps == pytest.approx(sigma, rel=0.02)  # the length asked for, up to the steps' discreteness


def test_a_stored_profile_is_rebuilt_from_itself_alone():
    stored = [(s, gamma_of(r)) for s in (100, 200, 300) for r in (0.05, 0.1)]
    x, error = coefficients(stored, (300, gamma_of(0.1)))
    np.testing.assert_allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)
    assert error < 1e-6
    _, error = coefficients(stored, (300, gamma_of(0.2)))
    assert error > 1e-3  # a length that was not stored is only approximated


def test_sixteen_stored_steps_fit_the_usual_lengths():
    steps = 4000
    stored = [(s, gamma_of(r)) for s in range(steps // 16, steps + 1, steps // 16) for r in (0.05, 0.1)]
    for sigma in (0.03, 0.07, 0.15, 0.2):
        assert coefficients(stored, (steps, gamma_of(sigma)))[1] < POOR_FIT, sigma
    for sigma in (0.02, 0.28):  # far beyond them: flagged
        assert coefficients(stored, (steps, gamma_of(sigma)))[1] > POOR_FIT, sigma
    assert coefficients(stored[:-2], (steps, gamma_of(0.05)))[1] > 10 * POOR_FIT  # without the last step: useless


def trajectory(steps):
    """θ_τ [steps, 3]: a drifting, oscillating weight vector, as a training run's weights do."""
    tau = np.arange(1, steps + 1, dtype=np.float64)[:, None]
    return np.hstack([np.sin(tau / 150.0), (tau / steps) ** 2, np.cos(tau / 40.0) * tau / steps])


@pytest.mark.parametrize("target", [0.03, 0.07, 0.15])
def test_a_rebuilt_average_matches_one_tracked_during_training(target):
    steps, every, kept = 1200, 50, (0.05, 0.10)
    theta = trajectory(steps)
    model = Vector(3)
    tracked, direct, stored = None, None, []
    for tau in range(1, steps + 1):
        with torch.no_grad():
            model.w.copy_(torch.from_numpy(theta[tau - 1]))
        tracked, direct = tracked or PowerEMA(model, kept), direct or PowerEMA(model, [target])
        tracked.update(model, tau)
        direct.update(model, tau)
        if tau % every == 0:
            stored += [(tau, gamma_of(s), avg.w.double().numpy().copy()) for s, avg in zip(kept, tracked.averages)]
    x, _ = coefficients([(t, g) for t, g, _ in stored], (steps, gamma_of(target)))
    rebuilt = sum(xi * w for xi, (_, _, w) in zip(x, stored))
    want = direct.averages[0].w.double().numpy()
    spread = theta.max(0) - theta.min(0)
    assert np.abs(rebuilt - want).max() < 0.01 * spread.min()
    # …where the neighbouring lengths differ by more than that: the test can tell one length from another.
    other = 0.8 * target
    x, _ = coefficients([(t, g) for t, g, _ in stored], (steps, gamma_of(other)))
    assert np.abs(sum(xi * w for xi, (_, _, w) in zip(x, stored)) - want).max() > 0.02 * spread.min()


def test_beta_copies_at_the_first_step_and_lengthens_after():
    g = gamma_of(0.1)
    assert beta(g, 1) == 0.0 and 0 < beta(g, 10) < beta(g, 100) < beta(g, 1000) < 1


# --- train.py and sample.py ------------------------------------------------------------------------------------
def flags(tmp_path, out, steps, extra=()):
    data = make_image_folder(str(tmp_path / "imgs"))
    return ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out", str(out), "--steps", str(steps),
            "--lr-decay", "constant", "--sample-every", "1000", "--save-every", "4", *MICRO_FLAGS, *extra]


POSTHOC = ["--posthoc-ema", "0.05", "0.1", "--posthoc-every", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phema")
    from tinyddpm.errors import run_cli
    assert run_cli(train.main, flags(tmp, tmp / "run", 7, POSTHOC)) == 0
    return tmp, tmp / "run"


def test_training_stores_the_averages_every_n_steps_and_at_each_checkpoint(run):
    _, out = run
    assert sorted(stored_steps(str(out))) == [3, 4, 6, 7]  # every 3 steps, and the checkpoints at 4 and 7
    ckpt = load_checkpoint(out / "ckpt.pt")
    last = torch.load(out / FOLDER / NAME.format(7), weights_only=True)
    assert last["sigma_rels"] == [0.05, 0.1] and last["step"] == 7
    for k, v in ckpt["models"]["posthoc"].items():
        assert torch.equal(v, last["weights"][k]), k
    # The two lengths differ from each other and from the ordinary EMA.
    name = next(k for k in ckpt["models"]["ema"] if k.endswith("weight"))
    a, b, e = last["weights"][f"0.{name}"], last["weights"][f"1.{name}"], ckpt["models"]["ema"][name]
    assert not torch.equal(a, b) and not torch.equal(a, e)


def test_tracking_leaves_the_training_unchanged(run, capsys):
    tmp, out = run
    plain = tmp / "untracked"
    assert run_script(train, flags(tmp, plain, 7), capsys)[0] == 0
    a, b = load_checkpoint(out / "ckpt.pt")["models"], load_checkpoint(plain / "ckpt.pt")["models"]
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def test_rebuilding_a_stored_length_gives_its_stored_weights(run):
    _, out = run
    ckpt = load_checkpoint(out / "ckpt.pt")
    from tinyddpm.models import build_unet
    net = build_unet(ckpt["run_config"], ckpt["labels"])
    state, note = rebuild(str(out), 0.1, 7, (0.05, 0.1), net)
    for k, v in state.items():
        torch.testing.assert_close(v, ckpt["models"]["posthoc"][f"1.{k}"], atol=1e-5, rtol=0)
    assert "σ_rel 0.1 at step 7" in note and "8 stored averages of 4 steps" in note and "rough" not in note
    assert "a rough fit" in rebuild(str(out), 0.28, 7, (0.05, 0.1), net)[1]


def test_sample_uses_the_rebuilt_weights_and_reports_them(run, capsys):
    tmp, out = run
    common = ["--ckpt", str(out / "ckpt.pt"), "--n", "2", "--steps", "2", "--device", "cpu"]
    code, _, err = run_script(sample, [*common, "--out", str(tmp / "a"), "--posthoc-ema", "0.08"], capsys)
    assert code == 0, err
    assert "post-hoc EMA σ_rel 0.08 at step 7" in err
    code, _, err = run_script(sample, [*common, "--out", str(tmp / "b")], capsys)
    assert code == 0 and "post-hoc" not in err
    a, b = (np.stack([np.asarray(Image.open(tmp / d / f)) for f in sorted(os.listdir(tmp / d)) if f != "grid.png"])
            for d in ("a", "b"))
    assert a.shape == b.shape and not np.array_equal(a, b)  # other weights, other images


def test_the_report_names_the_weights():
    summary = dict(model="ddpm", sampler="ddim", steps=10, eta=0.0, cfg_scale=None, ckpt="c", step=1, n=2,
                   posthoc_ema=0.08, ema=True,
                   results=[dict(condition=None, reference="cifar10:cat:test", fid=80.0, floor=48.0, ratio=1.67,
                                 kid=None, floor_kid=None, precision=0.7, recall=0.3, floor_precision=0.7,
                                 floor_recall=0.7, memorisation=None, seconds=1.0)])
    assert "post-hoc EMA σ_rel 0.08" in markdown(summary)
    assert "raw weights" in markdown({**summary, "posthoc_ema": None, "ema": False})
    assert "post-hoc" not in markdown({**summary, "posthoc_ema": None}) and "raw" not in markdown(
        {**summary, "posthoc_ema": None})


def test_resume_stores_the_same_averages_and_drops_later_ones(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_script(train, flags(tmp_path, full, 7, POSTHOC), capsys)[0] == 0
    assert run_script(train, flags(tmp_path, split, 4, POSTHOC), capsys)[0] == 0
    # A killed run may have stored past its checkpoint: that file must go, not be mixed in.
    shutil.copy(split / FOLDER / NAME.format(4), split / FOLDER / NAME.format(9))
    code, _, err = run_script(train, flags(tmp_path, split, 7, POSTHOC), capsys)
    assert code == 0 and "at step 4" in err, err
    assert sorted(stored_steps(str(split))) == sorted(stored_steps(str(full))) == [3, 4, 6, 7]
    for step in (6, 7):
        a, b = (torch.load(d / FOLDER / NAME.format(step), weights_only=True)["weights"] for d in (full, split))
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)


def test_refusals(run, tmp_path, capsys):
    tmp, out = run
    plain = tmp / "plain"
    if not plain.exists():
        assert run_script(train, flags(tmp, plain, 2), capsys)[0] == 0
    common = ["--n", "1", "--steps", "2", "--device", "cpu"]
    cases = [
        (sample, ["--ckpt", str(plain / "ckpt.pt"), "--posthoc-ema", "0.1", *common], ["tracked no post-hoc EMA"]),
        (sample, ["--ckpt", str(out / "ckpt.pt"), "--posthoc-ema", "0.1", "--raw", *common], ["--raw", "one of"]),
        (sample, ["--ckpt", str(out / "ckpt.pt"), "--posthoc-ema", "0.3", *common], ["--posthoc-ema", "between"]),
        (sample, ["--ckpt", str(out / "ckpt.pt"), "--posthoc-ema", "0", *common], ["--posthoc-ema", "between"]),
        (train, flags(tmp_path, tmp_path / "x", 2, ["--posthoc-ema", "0.3"]), ["--posthoc-ema", "less than"]),
        (train, flags(tmp_path, tmp_path / "y", 2, ["--posthoc-ema", "0.1", "--model", "dcgan"]),
         ["--posthoc-ema", "dcgan"]),
        (train, flags(tmp_path, tmp_path / "z", 2, ["--posthoc-every", "0"]), ["--posthoc-every", "at least 1"]),
    ]
    for script, argv, words in cases:
        code, _, err = run_script(script, [*argv, "--out", str(tmp_path / f"o{len(os.listdir(tmp_path))}")]
                                  if script is sample else argv, capsys)
        assert_user_error(code, err, *words)
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))


def test_a_damaged_stored_average_is_one_line(run, tmp_path, capsys):
    _, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / FOLDER / NAME.format(6), "r+b") as f:
        f.truncate(100)
    code, _, err = run_script(sample, ["--ckpt", str(copy / "ckpt.pt"), "--posthoc-ema", "0.1", "--n", "1",
                                       "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "s")], capsys)
    assert_user_error(code, err, "step_0000006.pt", "damaged", "delete it")
    assert not (tmp_path / "s").exists()
