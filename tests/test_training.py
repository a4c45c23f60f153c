import json
import os

import pytest
import torch

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.generate import LoadedModel, SamplingOptions
from tinyddpm.samplers import SamplerOptions


def folder_flags(tmp_path, out, steps, extra=()):
    data = make_image_folder(str(tmp_path / "imgs"))
    return ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out", str(out),
            "--steps", str(steps), *MICRO_FLAGS, *extra]


def test_tiny_model_overfits_a_few_images(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_script(train, folder_flags(tmp_path, out, 300, ["--lr", "3e-3", "--sample-every", "1000",
                                                                         "--save-every", "1000"]), capsys)
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert len(losses) == 30
    # ε-prediction on 4 images: the loss must fall well below its start (≈ 1 for a zero-initialised output).
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first / 3, (first, last)


def test_resume_equals_uninterrupted(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    # "Interrupted" = a shorter --steps here, so the learning rate must not depend on --steps: constant decay (a
    # cosine decay ends at --steps, so extending a run stretches it, as its help says).
    common = ["--save-every", "7", "--sample-every", "100", "--log-every", "5", "--lr-decay", "constant"]
    assert run_script(train, folder_flags(tmp_path, full, 20, common), capsys)[0] == 0
    assert run_script(train, folder_flags(tmp_path, split, 14, common), capsys)[0] == 0   # "interrupted" at 14
    code, _, err = run_script(train, folder_flags(tmp_path, split, 20, common), capsys)
    assert code == 0 and "resuming" in err and "at step 14" in err
    a, b = load_checkpoint(full / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    assert a["step"] == b["step"] == 20
    for part in ("model", "ema"):
        for k, v in a["models"][part].items():
            assert torch.equal(v, b["models"][part][k]), (part, k)
    assert a["sampler"] == b["sampler"]


def test_resume_refuses_other_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(train, folder_flags(tmp_path, out, 2), capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    code, _, err = run_script(train, folder_flags(tmp_path, out, 4, ["--base-channels", "64"]), capsys)
    assert_user_error(code, err, "another config", "base_channels")
    assert (out / "ckpt.pt").read_bytes() == before


def test_checkpoint_round_trip_and_sampling(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(train, folder_flags(tmp_path, out, 3), capsys)[0] == 0
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["kind"] == "ddpm" and ck["step"] == 3 and ck["run_config"].unet.base_channels == 32
    assert os.path.exists(out / "samples" / "step_0000003.png") and os.path.exists(out / "config.json")
    gen = LoadedModel(str(out / "ckpt.pt"), torch.device("cpu"))
    a, b = (gen.images(None, SamplingOptions(n=n, seed=seed, sampler=SamplerOptions(steps=4))) for seed, n in
            ((5, 3), (7, 1)))
    assert a.shape == (3, 16, 16, 3) and (a[2] == b[0]).all()   # per-image seeds
    code, stdout, err = run_script(sample, ["--ckpt", str(out / "ckpt.pt"), "--n", "3", "--out",
                                            str(tmp_path / "s"), "--steps", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "s")) == ["000000.png", "000001.png", "000002.png", "grid.png"]
    code, stdout, err = run_script(sample, ["--ckpt", str(out), "--n", "2", "--out", str(tmp_path / "s2"),
                                            "--sampler", "ddpm", "--device", "cpu"], capsys)
    assert code == 0, err


def test_learned_sigma_and_v_objective_train(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_script(train, folder_flags(tmp_path, out, 3, ["--learn-sigma", "--objective", "v",
                                                                       "--schedule", "cosine"]), capsys)
    assert code == 0, err
    code, stdout, err = run_script(sample, ["--ckpt", str(out), "--bpd", "--n", "2", "--device", "cpu",
                                            "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    assert "bits/dim" in stdout


def test_sample_grids_use_the_configured_sampler_and_eta(monkeypatch):
    """The grid's sampler, η and steps come from --grid-sampler / --grid-eta / --grid-steps (default DDIM, η 1: a
    young model's η = 0 grid is saturated noise); ddpm takes every timestep and no η."""
    from tinyddpm import training
    from tinyddpm.config import build_config
    from tinyddpm.models import build_diffusion, build_unet

    seen = []
    monkeypatch.setattr(training, "sample", lambda diffusion, fn, options, noise: seen.append(options) or
                        torch.zeros(2, 3, 8, 8))
    for extra, name, eta, steps in (({}, "ddim", 1.0, 3), ({"grid_eta": 0.0}, "ddim", 0.0, 3),
                                    ({"grid_sampler": "ddpm"}, "ddpm", 0.0, None)):
        cfg = build_config("tiny", {"data": {"image_size": 8}, "train": {"grid_size": 2, "grid_steps": 3, **extra}})
        labels = {"kind": "none", "names": []}
        training.grid_images(build_unet(cfg, labels), build_diffusion(cfg), cfg, labels, "cpu")
        assert (seen[-1].name, seen[-1].eta, seen[-1].steps) == (name, eta, steps)
