"""The DCGAN training loop (tinyddpm/gan_training.py) through train.py / sample.py, on tiny networks."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from tests.helpers import assert_user_error, make_image_folder, run_script
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.config import build_config, user_overrides
from tinyddpm.generate import LoadedModel, SamplingOptions
from tinyddpm.gan_training import train_gan

# Narrow networks on 16 px images: a step takes milliseconds, the structure is the real one.
GAN_FLAGS = ["--model", "dcgan", "--preset", "tiny", "--g-channels", "8", "--d-channels", "8", "--z-dim", "8",
             "--batch-size", "4", "--log-every", "2", "--grid-size", "4", "--device", "cpu"]


def folder_flags(tmp_path, out, steps, extra=()):
    data = make_image_folder(str(tmp_path / "imgs"), n=6)
    return ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out", str(out),
            "--steps", str(steps), *GAN_FLAGS, *extra]


def config_from(argv):
    """The RunConfig train.py would build for argv (to call train_gan directly)."""
    args = train.build_parser().parse_args(argv)
    return build_config(args.preset, user_overrides(args), model=args.model), args.out


@pytest.fixture(scope="module")
def gan_ckpt(tmp_path_factory):
    """A 3-step unconditional GAN run folder (shared by the sampling tests)."""
    tmp = tmp_path_factory.mktemp("gan")
    cfg, out = config_from(folder_flags(tmp, tmp / "run", 3))
    train_gan(cfg, out, torch.device("cpu"), log=lambda msg: None)
    return tmp / "run"


def test_run_folder_and_checkpoint_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_script(train, folder_flags(tmp_path, out, 4, ["--sample-every", "2", "--ema-decay", "0"]),
                              capsys)
    assert code == 0, err
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["kind"] == "dcgan" and ck["step"] == 4 and ck["labels"] == {"kind": "none", "names": []}
    assert set(ck["models"]) == {"generator", "discriminator", "ema"} and set(ck["optimizers"]) == {"g", "d"}
    assert ck["run_config"].gan.g_channels == 8 and ck["sampler"]["n"] == 6
    assert ck["optimizers"]["g"]["param_groups"][0]["betas"] == (0.5, 0.999)
    # --ema-decay 0: the EMA weights are the generator's (only the BatchNorm statistics are re-estimated).
    for k, v in dict(LoadedModel(str(out), torch.device("cpu")).net.named_parameters()).items():
        assert torch.equal(v, ck["models"]["generator"][k]), k
    assert json.load(open(out / "config.json"))["model"] == "dcgan"
    assert sorted(os.listdir(out / "samples")) == ["step_0000002.png", "step_0000004.png"]
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1 and r["d_loss"] > 0 and r["img_per_s"] > 0 for r in recs)
    line = [ln for ln in err.splitlines() if ln.startswith("step 4/4")][0]
    for part in ("| D ", "| G ", "D(x)", "D(G(z))", "img/s", "ETA"):
        assert part in line, line


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    common = ["--save-every", "3", "--sample-every", "100", "--log-every", "4"]
    cfg, full = config_from(folder_flags(tmp_path, tmp_path / "full", 10, common))
    _, split = config_from(folder_flags(tmp_path, tmp_path / "split", 10, common))
    train_gan(cfg, full, torch.device("cpu"), log=lambda msg: None)

    def crash_at_step_8(msg):  # the report at step 8 comes after the checkpoint at 6, before the one at 9
        if msg.startswith("step 8/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_gan(cfg, split, torch.device("cpu"), log=crash_at_step_8)
    assert load_checkpoint(os.path.join(split, "ckpt.pt"))["step"] == 6
    logs = []
    train_gan(cfg, split, torch.device("cpu"), log=logs.append)
    assert any("resuming" in m and "at step 6" in m for m in logs)
    a, b = load_checkpoint(os.path.join(full, "ckpt.pt")), load_checkpoint(os.path.join(split, "ckpt.pt"))
    assert a["step"] == b["step"] == 10 and a["sampler"] == b["sampler"]
    for part in ("generator", "discriminator", "ema"):
        for k, v in a["models"][part].items():
            assert torch.equal(v, b["models"][part][k]), (part, k)
    for part in ("g", "d"):
        for i, s in a["optimizers"][part]["state"].items():
            assert torch.equal(s["exp_avg"], b["optimizers"][part]["state"][i]["exp_avg"]), (part, i)
    log_a = [json.loads(x) for x in open(os.path.join(full, "log.jsonl"))]
    log_b = [json.loads(x) for x in open(os.path.join(split, "log.jsonl"))]
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [4, 8, 10]
    assert log_a[-1]["d_loss"] == log_b[-1]["d_loss"]  # steps 9-10 averaged in both (step 8's spans the restart)


def test_resume_refuses_other_config_or_kind(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script(train, folder_flags(tmp_path, out, 2), capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    code, _, err = run_script(train, folder_flags(tmp_path, out, 4, ["--g-channels", "16"]), capsys)
    assert_user_error(code, err, "another config", "g_channels")
    # The same folder as a diffusion run: the diffusion loop refuses the DCGAN checkpoint.
    argv = [a for a in folder_flags(tmp_path, out, 4) if a not in ("--model", "dcgan")]
    code, _, err = run_script(train, argv + ["--model", "ddpm"], capsys)
    assert_user_error(code, err, "dcgan")
    assert (out / "ckpt.pt").read_bytes() == before


def images(loaded, seed, n, cond=None):
    """uint8 [n, S, S, 3] for seeds seed … seed + n − 1 (cond: rows cycled over the images)."""
    return loaded.images(cond, SamplingOptions(n=n, seed=seed))


def test_sampling_per_image_seeds_and_batch_size(gan_ckpt, tmp_path, capsys):
    gen = LoadedModel(str(gan_ckpt), torch.device("cpu"))
    assert gen.kind == "dcgan" and not gen.net.training
    a, b = images(gen, seed=5, n=3), images(gen, seed=7, n=1)
    assert a.shape == (3, 16, 16, 3) and (a[2] == b[0]).all() and not (a[0] == a[1]).all()
    runs = {}
    for bs in ("1", "3"):
        code, stdout, err = run_script(sample, ["--ckpt", str(gan_ckpt), "--n", "3", "--batch-size", bs,
                                                "--out", str(tmp_path / bs), "--device", "cpu"], capsys)
        assert code == 0, err
        assert sorted(os.listdir(tmp_path / bs)) == ["000000.png", "000001.png", "000002.png", "grid.png"]
        runs[bs] = [np.asarray(Image.open(tmp_path / bs / f"00000{i}.png")) for i in range(3)]
    assert all((x == y).all() for x, y in zip(runs["1"], runs["3"]))
    raw = images(LoadedModel(str(gan_ckpt), torch.device("cpu"), use_ema=False), seed=5, n=3)
    assert not (raw == a).all()  # --raw really loads the other weights


@pytest.mark.parametrize("flags,word", [
    (["--sampler", "ddpm"], "--sampler"), (["--steps", "5"], "--steps"), (["--eta", "1"], "--eta"),
    (["--cfg-scale", "2"], "--cfg-scale"), (["--bpd"], "--bpd"), (["--no-clip"], "--no-clip"),
    (["--class", "cat"], "unconditional"),
])
def test_sample_refuses_diffusion_flags(gan_ckpt, tmp_path, capsys, flags, word):
    code, _, err = run_script(sample, ["--ckpt", str(gan_ckpt), "--n", "2", "--out", str(tmp_path / "s"),
                                       "--device", "cpu", *flags], capsys)
    assert_user_error(code, err, word)
    assert not os.path.exists(tmp_path / "s" / "grid.png")


@pytest.mark.parametrize("flags,word", [
    (["--objective", "v"], "--objective"), (["--learn-sigma"], "--learn-sigma"), (["--timesteps", "10"], "--timesteps"),
    (["--schedule", "cosine"], "--schedule"), (["--base-channels", "16"], "--base-channels"),
    (["--warmup", "5"], "--warmup"), (["--grad-clip", "0"], "--grad-clip"), (["--cond-drop", "0.2"], "--cond-drop"),
    (["--image-size", "24"], "power of two"),
])
def test_train_refuses_diffusion_flags(tmp_path, capsys, flags, word):
    out = tmp_path / "run"
    code, _, err = run_script(train, folder_flags(tmp_path, out, 2, flags), capsys)
    assert_user_error(code, err, word)
    assert not os.path.exists(out / "ckpt.pt")


def test_conditional_gan_on_cifar(cifar_root, tmp_path, capsys):
    out = tmp_path / "cond"
    argv = ["--dataset", "cifar", "--data-dir", cifar_root, "--class", "cat", "dog", "--conditional",
            "--out", str(out), "--steps", "2", *GAN_FLAGS]
    code, _, err = run_script(train, argv, capsys)
    assert code == 0, err
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["labels"] == {"kind": "class", "names": ["cat", "dog"]}
    assert ck["models"]["generator"]["embed.weight"].shape == (2, 64)  # both networks see the class
    assert ck["models"]["discriminator"]["embed.weight"].shape[0] == 2
    gen = LoadedModel(str(out), torch.device("cpu"))
    cat, dog = images(gen, 0, 2, torch.tensor([0])), images(gen, 0, 2, torch.tensor([1]))
    assert cat.shape == (2, 32, 32, 3) and not (cat == dog).all()  # same latents, other class, other images
    code, _, err = run_script(sample, ["--ckpt", str(out), "--n", "2", "--class", "dog", "--out",
                                       str(tmp_path / "dogs"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert (np.asarray(Image.open(tmp_path / "dogs" / "000001.png")) == dog[1]).all()
    code, _, err = run_script(sample, ["--ckpt", str(out), "--n", "2", "--class", "frog", "--out",
                                       str(tmp_path / "x"), "--device", "cpu"], capsys)
    assert_user_error(code, err, "frog", "cat, dog")


def test_batchnorm_calibration_matches_the_weights():
    from tinyddpm.config import GANConfig
    from tinyddpm.dcgan import Generator as DCGenerator, sample_z
    from tinyddpm.gan_training import BN_CALIBRATION_IMAGES, calibrate_batchnorm

    torch.manual_seed(0)
    G = DCGenerator(GANConfig(z_dim=8, g_channels=8), 16)
    bn = G.net[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as the EMA copy inherits from the raw generator
    seen = []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    calibrate_batchnorm(G, None, torch.device("cpu"))
    hook.remove()
    h = torch.cat(seen)  # [1024, C, 4, 4]: the first BatchNorm's input over all calibration latents
    assert h.shape[0] == BN_CALIBRATION_IMAGES and not G.training and bn.momentum == 0.1
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3)), rtol=0.05)  # mean of per-batch variances
    z = sample_z(BN_CALIBRATION_IMAGES, 8)
    with torch.no_grad():  # eval mode with the new statistics ≈ train mode on the calibration batch
        assert (G(z) - G.train()(z)).abs().max() < 0.05
