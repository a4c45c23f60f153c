"""Conditional diffusion end to end: the label vocabulary in the checkpoint, every bad condition refused in one line,
classifier-free guidance at w = 0 and w = 1 equal to the unconditional and conditional models, condition dropout
at the configured rate, and the scripts in-process for a class model (CIFAR cat/frog) and a multi-label shapes
model, including `sample.py --eval-labels`. The evaluator's own accuracy is tested in test_evaluator.py."""
import json
import os

import numpy as np
import pytest
import torch

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm import cond_eval, shapes
from tinyddpm import evaluator as ev
from tinyddpm import training
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.config import build_config
from tinyddpm.generate import LoadedModel, SamplingOptions, cycle
from tinyddpm.guidance import classifier_free
from tinyddpm.samplers import ImageNoise, SamplerOptions, sample as run_sampler
from tinyddpm.unet import UNet

CPU = torch.device("cpu")
SHAPES_FLAGS = ["--dataset", "shapes", "--conditional", "--shapes-count", "64", "--image-size", "32"]
# MICRO_FLAGS' U-Net is 32 channels wide everywhere: one channel per GroupNorm group, so an embedding *added*
# before the norm (Ho et al.'s ResBlock) is normalised away; scale-shift norm applies it after the norm.
COND_MICRO = ["--scale-shift-norm"]
TRAIN_STEPS = 20  # enough for the zero-initialised output layers and the condition embedding to move


def _train_quiet(out, flags, steps=TRAIN_STEPS):
    """train.py in-process from a module fixture (no capsys there): stdout/stderr are left to pytest."""
    from tinyddpm.errors import run_cli

    code = run_cli(train.main, ["--out", str(out), "--steps", str(steps), "--lr", "3e-3", *flags, *MICRO_FLAGS,
                                *COND_MICRO])
    assert code == 0
    return out / "ckpt.pt"


@pytest.fixture(scope="module")
def class_ckpt(tmp_path_factory, cifar_root):
    """A class-conditional micro model on the real CIFAR-10 cat and frog images."""
    return _train_quiet(tmp_path_factory.mktemp("cls") / "run",
                        ["--dataset", "cifar", "--data-dir", cifar_root, "--class", "cat", "frog", "--conditional"])


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory):
    """A multi-label micro model on 64 rendered shapes scenes at 32 px (the evaluator's size)."""
    return _train_quiet(tmp_path_factory.mktemp("shp") / "run", SHAPES_FLAGS)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """An unconditional micro model on a folder of images (1 step: only its label description matters)."""
    root = tmp_path_factory.mktemp("plain")
    data = make_image_folder(str(root / "imgs"))
    return _train_quiet(root / "run", ["--dataset", "folder", "--data-dir", data, "--image-size", "16"], steps=1)


@pytest.fixture(scope="module")
def evaluator32(tmp_path_factory):
    """An untrained 32 px evaluator: enough to test the command's plumbing (its accuracy is test_evaluator's job)."""
    path = tmp_path_factory.mktemp("ev") / "ev32.pt"
    torch.manual_seed(0)
    ev.save_evaluator(ev.Evaluator(32), path)
    return path


def _sample(ckpt, tmp_path, *extra):
    return ["--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--steps", "2", "--n", "2", "--device", "cpu",
            *extra]


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_store_the_label_vocabulary(class_ckpt, shapes_ckpt, plain_ckpt):
    assert load_checkpoint(class_ckpt)["labels"] == {"kind": "class", "names": ["cat", "frog"]}
    assert load_checkpoint(shapes_ckpt)["labels"] == {"kind": "multilabel", "names": list(shapes.VOCAB)}
    assert load_checkpoint(plain_ckpt)["labels"] == {"kind": "none", "names": []}
    raw = torch.load(shapes_ckpt, weights_only=True)  # plain data: no pickled classes
    assert raw["config"]["cond"]["conditional"] is True


# ------------------------------------------------------------------------------------------------ the scripts
def test_sample_class_model(class_ckpt, tmp_path, capsys):
    code, out, err = run_script(sample, _sample(class_ckpt, tmp_path, "--class", "frog", "Cat", "--cfg-scale", "3"),
                                capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "s")) == ["000000.png", "000001.png", "grid.png"]
    code, _, err = run_script(sample, _sample(class_ckpt, tmp_path / "b"), capsys)  # no --class: cycles, says so
    assert code == 0 and "cycling through all classes (cat, frog)" in err


def test_sample_shapes_model(shapes_ckpt, tmp_path, capsys):
    code, out, err = run_script(sample, _sample(shapes_ckpt, tmp_path, "--labels", "Red cube,  grey ball",
                                                "--cfg-scale", "2"), capsys)
    assert code == 0, err
    assert "wrote 2 images" in out
    assert os.path.exists(shapes_ckpt.parent / "samples" / f"step_{TRAIN_STEPS:07d}.png")  # the training grid


def test_condition_for_both_kinds(class_ckpt, shapes_ckpt):
    cls = LoadedModel(str(class_ckpt), CPU).condition(classes=["frog", " Cat"])
    assert cls.dtype == torch.long and cls.tolist() == [1, 0]  # indices into the stored names: one period
    assert cycle(cls, 3, 6).tolist() == [0, 1, 0]  # images 3, 4, 5 cycle through it
    multi = LoadedModel(str(shapes_ckpt), CPU).condition(labels="Red cube,  grey ball")
    want = np.zeros(24, np.float32)
    want[[shapes.VOCAB.index("red cube"), shapes.VOCAB.index("gray sphere")]] = 1
    assert multi.dtype == torch.float32 and multi.shape == (1, 24) and (multi.numpy() == want).all()
    assert cycle(multi, 0, 2).shape == (2, 24) and cycle(None, 0, 2) is None


BAD_INPUTS = [
    ("shapes", ["--labels", "pink cube"], ["unknown colour 'pink'", "colours: gray, red"]),
    ("shapes", ["--labels", "red pyramid"], ["unknown shape 'pyramid'", "shapes: cube, sphere, cylinder"]),
    ("shapes", ["--labels", "red cube, blue sphere, green cylinder, gray cube"], ["at most 3"]),
    ("shapes", ["--labels", "red cube, blue sphere, RED cube"], ["named twice"]),
    ("shapes", ["--labels", "red"], ["not '<colour> <shape>'"]),
    ("shapes", ["--class", "cat"], ["label sets", "--labels"]),
    ("shapes", [], ["needs --labels"]),
    ("shapes", ["--labels", "red cube", "--cfg-scale", "-1"], ["--cfg-scale must be at least 0"]),
    ("class", ["--labels", "red cube"], ["classes, not label sets", "cat, frog"]),
    ("class", ["--class", "dog"], ["'dog' was not trained", "knows: cat, frog"]),
    ("class", ["--class", "cat", "--cfg-scale", "-0.5"], ["--cfg-scale must be at least 0"]),
    ("plain", ["--class", "cat"], ["unconditional"]),
    ("plain", ["--labels", "red cube"], ["unconditional"]),
    ("plain", ["--cfg-scale", "2"], ["unconditional"]),
]


@pytest.mark.parametrize("which, extra, says", BAD_INPUTS, ids=[" ".join(b[1]) or b[0] for b in BAD_INPUTS])
def test_bad_conditions_are_one_line_errors(which, extra, says, class_ckpt, shapes_ckpt, plain_ckpt, tmp_path,
                                            capsys):
    ckpt = {"class": class_ckpt, "shapes": shapes_ckpt, "plain": plain_ckpt}[which]
    code, _, err = run_script(sample, _sample(ckpt, tmp_path, *extra), capsys)
    assert_user_error(code, err, *says)
    assert not os.path.exists(tmp_path / "s" / "grid.png")


# ------------------------------------------------------------------------------------------------ --eval-labels
def test_eval_labels_sweep(shapes_ckpt, evaluator32, tmp_path, capsys):
    argv = ["--ckpt", str(shapes_ckpt), "--eval-labels", "--evaluator", str(evaluator32), "--n-sets", "6",
            "--n-per-set", "2", "--cfg-sweep", "0", "1", "2.5", "--steps", "2", "--out", str(tmp_path / "e"),
            "--device", "cpu"]
    code, out, err = run_script(sample, argv, capsys)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("accuracy: ")]
    assert len(lines) == 3 and all("on 12 images of the held-out label sets" in ln for ln in lines), out
    assert "|   w | accuracy |" in out and "chance" in out
    summary = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [r["cfg_scale"] for r in summary["results"]] == [0, 1, 2.5]
    for line, r in zip(lines, summary["results"]):
        assert 0.0 <= r["accuracy"] <= 1.0 and f"{100 * r['accuracy']:.1f}%" in line
    assert summary["chance"] == pytest.approx(cond_eval.chance_accuracy(shapes.eval_label_sets()[:6]))
    assert sorted(os.listdir(tmp_path / "e")) == ["eval.json", "eval_grid_w0.png", "eval_grid_w1.png",
                                                  "eval_grid_w2.5.png", "eval_labels.txt"]
    listed = (tmp_path / "e" / "eval_labels.txt").read_text().splitlines()
    assert listed == [", ".join(f"{c} {s}" for c, s in objs) for objs in shapes.eval_label_sets()[:6]]


def test_eval_labels_conditions_follow_the_held_out_list(shapes_ckpt, evaluator32, tmp_path, monkeypatch, capsys):
    """Image j is generated for set j // n_per_set with seed --seed + j, the same seeds at every w."""
    calls = []

    def fake_images(self, cond, options, callback=None):
        seeds = list(options.seeds())
        calls.append((seeds, None if cond is None else cond.clone(), options.guidance_scale))
        return np.zeros((len(seeds), 32, 32, 3), np.uint8)

    monkeypatch.setattr(LoadedModel, "images", fake_images)
    argv = ["--ckpt", str(shapes_ckpt), "--eval-labels", "--evaluator", str(evaluator32), "--n-per-set", "3",
            "--seed", "7", "--cfg-sweep", "0", "2", "--out", str(tmp_path / "e"), "--device", "cpu"]
    code, out, err = run_script(sample, argv, capsys)
    assert code == 0, err
    n = 3 * shapes.EVAL_COUNT
    assert [c[2] for c in calls] == [0, 2] and calls[0][0] == calls[1][0] == list(range(7, 7 + n))
    assert calls[0][1] is None  # w = 0: the unconditional prediction, one forward pass
    want = np.stack([shapes.objects_to_multi_hot(s) for s in shapes.eval_label_sets()]).repeat(3, axis=0)
    assert torch.equal(calls[1][1], torch.from_numpy(want))
    assert "accuracy: " in out and f"on {n} images" in out


def test_eval_labels_sweep_takes_a_guidance_interval(shapes_ckpt, evaluator32, tmp_path, monkeypatch, capsys):
    """The sweep's own scales are the guidance: the interval is checked against them, not against --cfg-scale's
    default of 1, and reaches every scale's sampling."""
    calls = []

    def fake_images(self, cond, options, callback=None):
        calls.append((options.guidance_scale, options.guidance_interval))
        return np.zeros((options.n, 32, 32, 3), np.uint8)

    monkeypatch.setattr(LoadedModel, "images", fake_images)
    argv = ["--ckpt", str(shapes_ckpt), "--eval-labels", "--evaluator", str(evaluator32), "--autoguidance", "1",
            "--guidance-interval", "0.3", "inf", "--out", str(tmp_path / "e"), "--device", "cpu", "--cfg-sweep"]
    code, _, err = run_script(sample, argv + ["1", "2"], capsys)
    assert code == 0, err
    assert calls == [(1, (0.3, float("inf"))), (2, (0.3, float("inf")))]
    refused = tmp_path / "refused"
    argv[argv.index("--out") + 1] = str(refused)
    code, _, err = run_script(sample, argv + ["1"], capsys)       # a sweep of w = 1 alone guides nothing
    assert_user_error(code, err, "--guidance-interval", "none is on")
    assert not refused.exists()


@pytest.mark.parametrize("extra, says", [
    ([], ["needs --evaluator", "python -m tinyddpm.evaluator --out runs/evaluator.pt --size 32"]),
    (["--evaluator", "MISSING"], ["does not exist", "--size 32"]),
    (["--evaluator", "EV64"], ["trained on 64 px", "32 px", "--size 32"]),
    (["--evaluator", "EV32", "--cfg-sweep", "1", "-2"], ["finite and ≥ 0"]),
    (["--evaluator", "EV32", "--cfg-scale", "2", "--cfg-sweep", "1", "3"], ["not both"]),
    (["--evaluator", "EV32", "--n-per-set", "0"], ["--n-per-set must be between 1 and"]),
    (["--evaluator", "EV32", "--n-sets", "300"], ["--n-sets must be between 1 and 256"]),
    (["--evaluator", "EV32", "--labels", "red cube"], ["drop --class/--labels"]),
])
def test_eval_labels_errors(extra, says, shapes_ckpt, evaluator32, tmp_path, capsys):
    ev64 = tmp_path / "ev64.pt"
    ev.save_evaluator(ev.Evaluator(64), ev64)
    names = {"MISSING": str(tmp_path / "nope.pt"), "EV64": str(ev64), "EV32": str(evaluator32)}
    argv = ["--ckpt", str(shapes_ckpt), "--eval-labels", "--out", str(tmp_path / "e"), "--device", "cpu"]
    code, _, err = run_script(sample, argv + [names.get(a, a) for a in extra], capsys)
    assert_user_error(code, err, *says)
    assert not os.path.exists(tmp_path / "e" / "eval.json")


@pytest.mark.parametrize("which, extra, says", [
    ("class", ["--eval-labels"], ["scores a shapes model", "conditioned on classes"]),
    ("plain", ["--eval-labels"], ["scores a shapes model", "unconditional"]),
    ("shapes", ["--evaluator", "x.pt"], ["only apply with --eval-labels"]),
    ("shapes", ["--cfg-sweep", "1", "2"], ["only apply with --eval-labels"]),
])
def test_eval_labels_needs_a_shapes_model_and_the_flag(which, extra, says, class_ckpt, shapes_ckpt, plain_ckpt,
                                                       tmp_path, capsys):
    ckpt = {"class": class_ckpt, "shapes": shapes_ckpt, "plain": plain_ckpt}[which]
    code, _, err = run_script(sample, ["--ckpt", str(ckpt), "--out", str(tmp_path), "--device", "cpu", *extra],
                              capsys)
    assert_user_error(code, err, *says)


def test_chance_accuracy_matches_random_rankings():
    sets = shapes.eval_label_sets()
    k = np.array([len(s) for s in sets])
    assert cond_eval.chance_accuracy(sets) == pytest.approx((k * k).sum() / (24 * k.sum()))
    g = torch.Generator().manual_seed(0)
    labels = torch.from_numpy(cond_eval.conditions(sets, 1))
    trials = [ev.iclevr_accuracy(torch.rand(labels.shape, generator=g), labels) for _ in range(200)]
    # 200 trials of 730 objects each: the mean's standard error is about 0.0009.
    assert np.mean(trials) == pytest.approx(cond_eval.chance_accuracy(sets), abs=0.004)


# ------------------------------------------------------------------------------------------------ guidance
def _random_multilabel_unet(seed=0):
    """A real U-Net whose zero-initialised layers are given random weights, so every output depends on the input."""
    cfg = build_config("tiny", {}).unet
    model = UNet(cfg, 16, cond_kind="multilabel", num_cond=shapes.NUM_LABELS).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class _ToDouble(torch.nn.Module):
    def forward(self, x):
        return x.double()


def test_guidance_w0_is_unconditional_and_w1_conditional_with_the_same_noise():
    from tinyddpm.diffusion import GaussianDiffusion

    # float64 weights: guidance runs one batch of 2B, and float32 convolutions round differently at another batch
    # size (~1e-5 here, which the first DDIM step multiplies by 1/√ᾱ_T); in float64 that noise is ~1e-15 and
    # vanishes when the sampler casts the output to float32, so the trajectories can be compared exactly.
    model = _random_multilabel_unet().double()
    model.time_mlp.insert(0, _ToDouble())  # the sinusoidal embedding is float32 by design (t reaches ~1000)
    diffusion = GaussianDiffusion.from_config(build_config("tiny", {"diffusion": {"timesteps": 50}}).diffusion)
    cond = torch.from_numpy(np.stack([shapes.parse_labels("red cube, blue sphere"), shapes.parse_labels("cyan cube")]))
    seeds, shape = [3, 4], (3, 16, 16)

    def run(model_fn):
        return run_sampler(diffusion, lambda x, t: model_fn(x.double(), t), SamplerOptions("ddim", 5),
                           ImageNoise(seeds, shape, CPU))

    uncond = run(lambda x, t: model(x, t))  # the null condition
    plain = run(lambda x, t: model(x, t, cond))
    assert (uncond - plain).abs().max() > 1e-2  # the condition matters, so the checks below can fail
    assert torch.equal(run(classifier_free(model, cond, scale=1.0)), plain)
    assert torch.equal(run(classifier_free(model, cond, scale=0.0)), uncond)
    # One step of w = 3 is u + 3·(c − u) from two separate passes, mixed in float32 (guidance.py: as EDM2, so a
    # bf16 network's outputs are not rounded before the difference is amplified), so equal to float32 rounding.
    x, t = torch.randn(2, *shape, dtype=torch.float64), torch.tensor([40, 7])
    u, c = model(x, t), model(x, t, cond)
    w3 = classifier_free(model, cond, scale=3.0)(x, t)
    assert w3.dtype == torch.float32 and (c - u).abs().max() > 1e-2
    assert torch.allclose(w3.double(), u + 3 * (c - u), rtol=1e-6, atol=1e-6)


def test_trained_model_output_depends_on_the_condition(shapes_ckpt):
    gen = LoadedModel(str(shapes_ckpt), CPU, use_ema=False)  # after 20 steps the EMA (decay 0.999) has barely moved
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    a = torch.from_numpy(shapes.parse_labels("red cube, blue sphere")).expand(2, -1)
    b = torch.from_numpy(shapes.parse_labels("yellow cylinder")).expand(2, -1)
    with torch.no_grad():
        out_a, out_b, out_null = gen.net(x, t, a), gen.net(x, t, b), gen.net(x, t)
    assert (out_a - out_b).abs().max() > 1e-4 and (out_a - out_null).abs().max() > 1e-4
    # and so do the generated images (same seeds, different label sets)
    options = SamplingOptions(n=2, sampler=SamplerOptions(steps=3))
    img_a, img_b = gen.images(a, options), gen.images(b, options)
    assert (img_a.astype(int) - img_b.astype(int)).any()


# ------------------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("rate, steps", [(0.25, 20), (0.0, 2), (1.0, 2)])
def test_condition_dropout_rate_is_as_configured(rate, steps, tmp_path, monkeypatch):
    """Count the dropped conditions the training loop feeds the model (a pre-forward hook on the U-Net)."""
    seen = []
    real_build = training.build_unet

    def recording_build(cfg, labels):
        model = real_build(cfg, labels)

        def hook(module, args):
            if len(args) == 4 and args[3] is not None:  # training calls model(x_t, t, cond, drop)
                seen.append((args[2].clone(), args[3].clone()))
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(training, "build_unet", recording_build)
    flags = ["--dataset", "shapes", "--conditional", "--shapes-count", "64", "--image-size", "16",
             "--cond-drop", str(rate), "--batch-size", "32", "--sample-every", "1000", "--save-every", "1000"]
    from tinyddpm.errors import run_cli

    assert run_cli(train.main, ["--out", str(tmp_path / "run"), "--steps", str(steps), *MICRO_FLAGS, *flags]) == 0
    assert len(seen) == steps
    drops = torch.cat([d for _, d in seen])
    conds = torch.cat([c for c, _ in seen])
    assert drops.dtype == torch.bool and drops.numel() == steps * 32
    assert ((conds.sum(1) >= 1) & (conds.sum(1) <= 3)).all()  # the batch's real multi-hot labels
    frac = drops.float().mean().item()
    if rate in (0.0, 1.0):
        assert frac == rate
    else:  # 640 Bernoulli draws: standard deviation ≈ 0.017, so ± 0.08 is > 4.5σ (and 0.1 or 0.5 fail)
        assert abs(frac - rate) < 0.08, frac
