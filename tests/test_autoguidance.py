"""Autoguidance: the early EMA snapshot train.py keeps (ema.Snapshot), the guided network function
(guidance.autoguided), sample.py's default and every refusal."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.config import GUIDE_AT, build_config
from tinyddpm.errors import UserError, run_cli
from tinyddpm.files import atomic_torch_save
from tinyddpm.generate import CLASS_AUTOGUIDANCE, DEFAULT_AUTOGUIDANCE, LoadedModel, SamplingOptions
from tinyddpm.guidance import autoguided, limited
from tinyddpm.samplers import SamplerOptions, noise_levels

CPU = torch.device("cpu")


def options(n, steps, **kw):
    """SamplingOptions for n images (seeds 0 … n−1) with the default sampler at `steps` model calls."""
    return SamplingOptions(n=n, sampler=SamplerOptions(steps=steps), **kw)


def run_flags(tmp_path, out, steps, extra=()):
    data = make_image_folder(str(tmp_path / "imgs"))
    # A constant learning rate, so a shorter run's weights are a longer run's weights at that step.
    return ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out", str(out), "--steps", str(steps),
            "--lr-decay", "constant", "--sample-every", "1000", "--save-every", "1000", *MICRO_FLAGS, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An 8-step run that keeps its snapshot after step 4, and a 4-step run of the same seed."""
    tmp = tmp_path_factory.mktemp("ag")
    long, short = tmp / "long", tmp / "short"
    assert run_cli(train.main, run_flags(tmp, long, 8, ["--guide-at", "0.5"])) == 0
    assert run_cli(train.main, run_flags(tmp, short, 4, ["--guide-at", "0"])) == 0
    return tmp, long / "ckpt.pt", short / "ckpt.pt"


def test_autoguided_is_bad_plus_w_times_the_difference():
    good = lambda x, t: torch.cat([x * 3.0, x + 7.0], 1)   # [B, 2C]: mean part, then a "learned variance" part
    bad = lambda x, t: torch.cat([x * 1.0, x - 5.0], 1)
    x, t = torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    assert autoguided(good, bad, 1.0) is good                                  # w = 1: the good model alone
    out = autoguided(good, bad, 2.5)(x, t)
    assert torch.allclose(out[:, :3], x * 1.0 + 2.5 * (x * 3.0 - x * 1.0))    # bad + w·(good − bad)
    assert torch.allclose(out[:, 3:], x + 7.0)                                 # the variance is the good model's
    assert torch.allclose(autoguided(good, bad, 0.0)(x, t)[:, :3], x)          # w = 0: the bad model's mean


def test_the_snapshot_is_the_ema_of_its_step(runs):
    _, long, short = runs
    a, b = load_checkpoint(long), load_checkpoint(short)
    assert a["step"] == 8 and a["models"]["guide"]["step"] == 4
    assert b["models"]["guide"] == {}                                          # --guide-at 0 keeps none
    for k, v in b["models"]["ema"].items():
        assert torch.equal(a["models"]["guide"]["weights"][k], v), k
    assert any(not torch.equal(a["models"]["ema"][k], v) for k, v in b["models"]["ema"].items())  # 4 steps on


def test_network_fn_combines_the_two_networks(runs):
    _, long, _ = runs
    gen = LoadedModel(str(long), CPU)
    assert gen.guide_net is not None and gen.guide_step == 4 and gen.default_autoguidance() == DEFAULT_AUTOGUIDANCE
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 60])
    with torch.no_grad():
        want = gen.guide_net(x, t) + 3.0 * (gen.net(x, t) - gen.guide_net(x, t))
        assert torch.allclose(gen.network_fn(None, 1.0, 3.0)(x, t), want, atol=1e-5)
        assert torch.equal(gen.network_fn(None, 1.0, 1.0)(x, t), gen.net(x, t))
    plain = gen.images(None, options(2, 3))
    guided_ = gen.images(None, options(2, 3, autoguidance=DEFAULT_AUTOGUIDANCE))
    assert not np.array_equal(plain, guided_)


def test_sample_py_autoguides_by_default_and_says_so_in_the_report_settings(runs, capsys):
    tmp, long, _ = runs
    out = tmp / "s-default"
    code, _, err = run_script(sample, ["--ckpt", str(long), "--n", "2", "--steps", "3", "--out", str(out),
                                       "--device", "cpu"], capsys)
    assert code == 0, err
    gen = LoadedModel(str(long), CPU)
    for autoguidance, same in ((DEFAULT_AUTOGUIDANCE, True), (1.0, False)):
        want = gen.images(None, options(2, 3, autoguidance=autoguidance))
        got = np.stack([np.asarray(Image.open(out / f"00000{i}.png")) for i in range(2)])
        assert np.array_equal(got, want) == same, autoguidance
    code, _, err = run_script(sample, ["--ckpt", str(long), "--n", "2", "--steps", "3", "--out", str(tmp / "s-off"),
                                       "--autoguidance", "1", "--device", "cpu"], capsys)
    assert code == 0, err
    got = np.stack([np.asarray(Image.open(tmp / "s-off" / f"00000{i}.png")) for i in range(2)])
    assert np.array_equal(got, gen.images(None, options(2, 3)))


def test_a_checkpoint_without_snapshot_samples_plainly_and_refuses_the_flag(runs, capsys):
    tmp, _, short = runs
    gen = LoadedModel(str(short), CPU)
    assert gen.guide_net is None and gen.default_autoguidance() == 1.0
    out = tmp / "s-short"
    code, _, err = run_script(sample, ["--ckpt", str(short), "--n", "1", "--steps", "2", "--out", str(out),
                                       "--autoguidance", "2", "--device", "cpu"], capsys)
    assert_user_error(code, err, "--autoguidance 2", "no", "drop --autoguidance")
    assert not out.exists()
    with pytest.raises(UserError, match="early snapshot"):
        options(1, 2, autoguidance=2.0).check(gen)
    with pytest.raises(UserError, match="early snapshot"):  # unchecked options are refused all the same
        gen.images(None, options(1, 2, autoguidance=2.0))


@pytest.mark.parametrize("flags, words", [
    (["--autoguidance", "-1"], ["autoguidance"]),
    (["--autoguidance", "2", "--bpd"], ["--autoguidance", "--bpd"]),
    (["--guidance-interval", "5", "1"], ["--guidance-interval", "LO < HI", "5 1"]),
    (["--guidance-interval", "1", "1"], ["--guidance-interval", "LO < HI"]),
    (["--guidance-interval", "-1", "1"], ["--guidance-interval", "at least 0"]),
    (["--guidance-interval", "nan", "1"], ["--guidance-interval", "number"]),
    (["--guidance-interval", "0.3", "inf", "--autoguidance", "1"], ["--guidance-interval", "none is on"]),
    (["--guidance-interval", "0.3", "inf", "--bpd"], ["--guidance-interval", "--bpd"]),
])
def test_sample_refusals(runs, capsys, flags, words):
    tmp, long, _ = runs
    code, _, err = run_script(sample, ["--ckpt", str(long), "--out", str(tmp / "refused"), "--device", "cpu",
                                       *flags], capsys)
    assert_user_error(code, err, *words)
    assert not (tmp / "refused").exists()


def test_an_older_checkpoint_without_the_entry_resumes_and_samples(runs, capsys):
    tmp, long, _ = runs
    old_run = tmp / "old"
    os.makedirs(old_run)
    ck = load_checkpoint(long)
    del ck["models"]["guide"], ck["run_config"]
    ck["config"]["train"].pop("guide_at")      # as an older tinyddpm wrote it
    atomic_torch_save(ck, old_run / "ckpt.pt")
    assert LoadedModel(str(old_run), CPU).guide_net is None
    code, _, err = run_script(train, run_flags(tmp, old_run, 10, ["--guide-at", "0.5"]), capsys)
    assert code == 0 and "resuming" in err, err
    # Resumed past the snapshot's step (5 of 10): no snapshot of another age is made up.
    assert load_checkpoint(old_run / "ckpt.pt")["models"]["guide"] == {}


def test_which_runs_keep_a_snapshot():
    assert build_config("tiny", {}).train.guide_at == GUIDE_AT > 0
    assert build_config("tiny", {"cond": {"conditional": True}}).train.guide_at == GUIDE_AT  # eighth round
    shapes = {"data": {"dataset": "shapes"}, "cond": {"conditional": True}}
    assert build_config("tiny", shapes).train.guide_at == GUIDE_AT
    assert build_config("tiny", {"cond": {"conditional": True}, "train": {"guide_at": 0.3}}).train.guide_at == 0.3
    assert build_config("tiny", {"train": {"guide_at": 0.0}}).train.guide_at == 0.0
    assert build_config("tiny", {}, model="dcgan").train.guide_at == 0.0
    assert build_config("small", {}).train.guide_at == 0.0


def seeded_checkpoint(path, kind):
    """A checkpoint made from seeds (tests/same_images.py's recipe: no training) whose autoguidance snapshot is the
    same network with other noise, conditioned on nothing, on classes (cat, frog) or on shapes label sets."""
    from tests.same_images import NOISE_STD, SEEDS, fixed_checkpoint
    from tinyddpm.checkpoint import save_checkpoint
    from tinyddpm.models import build_unet
    from tinyddpm.shapes import VOCAB

    if kind != "multilabel":
        return fixed_checkpoint(str(path), conditional=kind == "class")
    cfg = build_config("tiny", {"data": {"dataset": "shapes"}, "cond": {"conditional": True}})
    labels = {"kind": "multilabel", "names": list(VOCAB)}
    weights = {}
    for name, seed in SEEDS.items():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        weights[name] = {k: (v + NOISE_STD * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                         for k, v in build_unet(cfg, labels).state_dict().items()}
    save_checkpoint(str(path), dict(kind="ddpm", config=cfg.to_dict(), labels=labels, step=8000,
                                    models=dict(model=weights["ema"], ema=weights["ema"],
                                                guide=dict(step=2000, weights=weights["guide"])),
                                    optimizers={}))
    return str(path)


CONDITION_FLAGS = {"none": [], "class": ["--class", "frog"], "multilabel": ["--labels", "red cube, blue sphere"]}


@pytest.mark.parametrize("kind,want", [("none", DEFAULT_AUTOGUIDANCE), ("multilabel", DEFAULT_AUTOGUIDANCE),
                                       ("class", CLASS_AUTOGUIDANCE)])
def test_the_default_w_depends_on_the_condition(tmp_path, capsys, kind, want):
    """w = 1.5 won on class-conditional cat + frog, w = 2 on cats and shapes (docs/recipe.md, eighth round): a
    checkpoint with a snapshot and no --autoguidance samples the images of its kind's w, not of the other's, nor
    plain ones."""
    ckpt, out = seeded_checkpoint(tmp_path / "ckpt.pt", kind), tmp_path / "out"
    flags = ["--n", "2", "--steps", "2", "--device", "cpu", *CONDITION_FLAGS[kind]]
    code, _, err = run_script(sample, ["--ckpt", ckpt, "--out", str(out), *flags], capsys)
    assert code == 0, err
    got = np.stack([np.asarray(Image.open(out / f"00000{i}.png")) for i in range(2)])
    gen = LoadedModel(ckpt, CPU)
    cond = gen.condition(CONDITION_FLAGS[kind][1:2] if kind == "class" else None,
                         CONDITION_FLAGS[kind][1] if kind == "multilabel" else None)
    for w in (DEFAULT_AUTOGUIDANCE, CLASS_AUTOGUIDANCE, 1.0):
        same = np.array_equal(got, gen.images(cond, options(2, 2, autoguidance=w)))
        assert same == (w == want), (kind, w)


def test_dcgan_refuses_guide_at(tmp_path, capsys):
    code, _, err = run_script(train, ["--model", "dcgan", "--dataset", "folder", "--data-dir",
                                      make_image_folder(str(tmp_path / "imgs")), "--guide-at", "0.5",
                                      "--out", str(tmp_path / "gan"), "--device", "cpu"], capsys)
    assert_user_error(code, err, "--guide-at", "dcgan")
    assert not (tmp_path / "gan").exists()


def test_a_narrow_guide_network_trains_alongside_and_guides(tmp_path, capsys):
    """--guide-channels 8: a second, narrower U-Net trains on the same batches until the snapshot step; its EMA there
    is the autoguidance model, which sample.py builds at that width."""
    out = tmp_path / "narrow"
    code, _, err = run_script(train, run_flags(tmp_path, out, 6, ["--guide-at", "0.5", "--guide-channels", "8"]),
                              capsys)
    assert code == 0 and "narrow guide network's EMA of step 3" in err, err
    ck = load_checkpoint(out / "ckpt.pt")
    snap, main = ck["models"]["guide"], ck["models"]["ema"]
    assert snap["step"] == 3 and snap["weights"].keys() == ck["models"]["guide_ema"].keys()
    assert snap["weights"]["conv_in.weight"].shape[0] == 8 < main["conv_in.weight"].shape[0]
    # It stopped training at the snapshot: its EMA and weights are those of step 3 (the EMA is the snapshot).
    for k, v in snap["weights"].items():
        assert torch.equal(ck["models"]["guide_ema"][k], v), k
    loaded = LoadedModel(str(out), CPU)
    assert loaded.guide_step == 3 and loaded.default_autoguidance() == DEFAULT_AUTOGUIDANCE
    code, _, err = run_script(sample, ["--ckpt", str(out), "--n", "2", "--steps", "3", "--out", str(tmp_path / "s"),
                                       "--device", "cpu"], capsys)
    assert code == 0, err
    # The same command again: nothing to do, and the narrow network came back from the checkpoint.
    code, _, err = run_script(train, run_flags(tmp_path, out, 6, ["--guide-at", "0.5", "--guide-channels", "8"]),
                              capsys)
    assert code == 0, err


@pytest.mark.parametrize("flags, words", [(["--guide-at", "0"], ["--guide-channels", "--guide-at"]),
                                          (["--guide-channels", "5"], ["--guide-channels 5", "--base-channels"])])
def test_a_narrow_guide_needs_a_snapshot_and_a_valid_width(tmp_path, capsys, flags, words):
    argv = run_flags(tmp_path, tmp_path / "x", 2, ["--guide-channels", "8", *flags])
    code, _, err = run_script(train, argv, capsys)
    assert_user_error(code, err, *words)
    assert not (tmp_path / "x").exists()


# --- guidance in a limited interval of noise levels (--guidance-interval) ---------------------------------------

def test_limited_is_guided_inside_and_plain_outside_per_image():
    guided = lambda x, t: x * 2.0
    plain = lambda x, t: (x + 1.0).to(torch.bfloat16)          # a bf16 network output is cast to float32
    x, t = torch.randn(3, 3, 4, 4), torch.tensor([1.0, 5.0, 9.0])
    fn = limited(guided, plain, lambda t: t > 4.0)
    out = fn(x, t)
    assert out.dtype == torch.float32
    assert torch.equal(out[0], (x[0] + 1.0).to(torch.bfloat16).float())
    assert torch.equal(out[1:], x[1:] * 2.0)
    assert torch.equal(fn(x, torch.full((3,), 7.0)), x * 2.0)
    assert torch.equal(fn(x, torch.zeros(3)), (x + 1.0).to(torch.bfloat16).float())


def test_the_interval_is_in_noise_levels_sigma(runs):
    _, long, _ = runs
    gen = LoadedModel(str(long), CPU)
    x = torch.randn(1, 3, 16, 16)
    assert gen.diffusion.num_timesteps == 100                  # MICRO_FLAGS; σ increases with t
    lo, hi = float(gen.diffusion.sigma(20.0)), float(gen.diffusion.sigma(40.0))
    fn = gen.network_fn(None, 1.0, 3.0, (lo, hi))
    with torch.no_grad():
        for t, guided in ((30.0, True), (90.0, False), (10.0, False), (20.0, False), (40.0, True)):  # (LO, HI]
            tt = torch.tensor([t])
            want = gen.network_fn(None, 1.0, 3.0)(x, tt) if guided else gen.net(x, tt)
            assert torch.allclose(fn(x, tt), want, atol=1e-6), t
    everywhere = gen.images(None, options(2, 3, autoguidance=3.0))
    assert np.array_equal(gen.images(None, options(2, 3, autoguidance=3.0, guidance_interval=(0.0, float("inf")))),
                          everywhere)
    nowhere = gen.images(None, options(2, 3, autoguidance=3.0, guidance_interval=(1e6, float("inf"))))
    assert np.array_equal(nowhere, gen.images(None, options(2, 3)))
    _, sigmas = noise_levels(gen.diffusion, 3, gen.diffusion.num_timesteps - 1)  # the 3 calls' σ, decreasing
    part = gen.images(None, options(2, 3, autoguidance=3.0, guidance_interval=(float(sigmas[1]), float("inf"))))
    assert not np.array_equal(part, everywhere) and not np.array_equal(part, nowhere)


def test_sample_py_takes_the_interval_and_the_report_names_it(runs, capsys):
    from tinyddpm.report import markdown

    tmp, long, _ = runs
    out = tmp / "s-interval"
    code, _, err = run_script(sample, ["--ckpt", str(long), "--n", "2", "--steps", "3", "--out", str(out),
                                       "--guidance-interval", "1", "inf", "--device", "cpu"], capsys)
    assert code == 0, err
    got = np.stack([np.asarray(Image.open(out / f"00000{i}.png")) for i in range(2)])
    gen = LoadedModel(str(long), CPU)
    want = gen.images(None, options(2, 3, autoguidance=DEFAULT_AUTOGUIDANCE, guidance_interval=(1.0, float("inf"))))
    assert np.array_equal(got, want)
    result = dict(condition=None, reference="cifar10:cat:test", fid=84.4, floor=48.0, ratio=1.76, kid=None,
                  floor_kid=None, precision=None, floor_precision=None, recall=None, floor_recall=None,
                  memorisation=None, seconds=1.0)
    summary = dict(model="ddpm", sampler="dpmpp-2m-sde", steps=50, eta=0.0, cfg_scale=None, autoguidance=2.0,
                   guide_step=892, guidance_interval="(0.28, inf]", ckpt="ckpt.pt", step=3570, n=1000,
                   results=[result])
    assert "autoguidance 2 (step 892), guided at σ in (0.28, inf]" in markdown(summary)


def test_a_checkpoint_without_snapshot_refuses_the_interval_without_cfg(runs, capsys):
    tmp, _, short = runs
    code, _, err = run_script(sample, ["--ckpt", str(short), "--n", "1", "--steps", "2", "--out", str(tmp / "r2"),
                                       "--guidance-interval", "0.3", "inf", "--device", "cpu"], capsys)
    assert_user_error(code, err, "--guidance-interval", "none is on")
