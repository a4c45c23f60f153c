"""Fusion and DDIM-inversion interpolation (tinyddpm/fusion.py, sample.py --fuse / --interpolate)."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm import fusion, samplers
from tinyddpm.fusion import FusionOptions, InterpolationOptions
from tinyddpm.generate import LoadedModel, SamplingOptions
from tinyddpm.imageio import to_pixels
from tinyddpm.samplers import ImageNoise, SamplerOptions

SIZE = 16           # the micro model's resolution
T = 100             # MICRO_FLAGS --timesteps
FAST = ["--steps", "3", "--device", "cpu"]


def _train(argv):
    from tinyddpm.errors import run_cli

    assert run_cli(train.main, argv) == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-step micro diffusion model (T = 100, linear schedule) and two input images of other sizes/formats."""
    root = tmp_path_factory.mktemp("fusion")
    data = make_image_folder(str(root / "imgs"), n=4, size=SIZE)
    _train(["--dataset", "folder", "--data-dir", data, "--image-size", str(SIZE), "--out", str(root / "run"),
            "--steps", "3", *MICRO_FLAGS, "--sample-every", "1000", "--save-every", "1000"])
    # Not the model's size or format: a wide, half-transparent RGBA PNG and a tall grayscale JPEG.
    yy, xx = np.mgrid[0:24, 0:40] / 40.0
    rgba = np.stack([255 * xx, 255 * (1 - yy), 128 + 100 * np.sin(6 * xx), 255 - 128 * yy], -1)
    a = root / "a.png"
    Image.fromarray(rgba.clip(0, 255).astype(np.uint8), "RGBA").save(a)
    b = root / "b.jpg"
    Image.fromarray(np.tile(np.linspace(0, 255, 20, dtype=np.uint8)[:, None], (1, 18)), "L").save(b)
    return dict(root=root, ckpt=str(root / "run" / "ckpt.pt"), a=str(a), b=str(b),
                gen=LoadedModel(str(root / "run" / "ckpt.pt"), torch.device("cpu")))


def _inputs(tiny):
    return fusion.load_image(tiny["a"], SIZE), fusion.load_image(tiny["b"], SIZE)


def _fuse(tiny, a, b, lams, t_user, noise="shared", seed=0, n=2, sampler="ddim"):
    """Fusions [n, len(lams), 3, S, S] of seeds seed … seed + n − 1 at paper step t_user (ddim: 5 steps; ddpm takes
    every step from t_user)."""
    options = SamplingOptions(n=n, seed=seed, sampler=SamplerOptions(sampler, None if sampler == "ddpm" else 5))
    return fusion.fuse(tiny["gen"], a, b, FusionOptions(tuple(lams), t_user, noise), options)


def test_inputs_are_rgb_square_in_range(tiny):
    a, b = _inputs(tiny)
    assert a.shape == b.shape == (3, SIZE, SIZE) and a.min() >= -1 and b.max() <= 1
    assert torch.equal(b[0], b[1]) and torch.equal(b[1], b[2])   # grayscale became R = G = B
    assert fusion.to_index(1, T) == 0 and fusion.to_index(T, T) == T - 1 and fusion.default_t(1000) == 500


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_tiny_t_fusion_is_the_pixel_mix(tiny, sampler):
    # At --t 1 (index 0) the mixture is x = √ᾱ·mix + √(1−ᾱ)·ε and the single denoising step returns
    # x0̂ = mix + √(1−ᾱ)/√ᾱ·(ε − ε̂) (DDPM's last mean is x0̂ too: its posterior weight on x0 is 1 at t = 0), clipped
    # to [−1, 1], which only brings it closer to mix. So |fused − mix| ≤ √(β₁/(1−β₁))·(max|ε| + max|ε̂|); with
    # T = 100 the linear schedule's β₁ is 1e-3, so the bound is 0.032·(max|ε| + max|ε̂|).
    a, b = _inputs(tiny)
    lam, seeds = 0.3, [0, 1]
    out = _fuse(tiny, a, b, [lam], 1, seed=seeds[0], n=len(seeds), sampler=sampler)[:, 0]
    mix = (1 - lam) * a + lam * b
    eps, _ = fusion.forward_noise(seeds, a.shape)
    t0 = torch.zeros(len(seeds), dtype=torch.long)
    x = tiny["gen"].diffusion.q_sample(mix.expand_as(eps), t0, eps)
    eps_hat = tiny["gen"].net(x, t0)
    scale = tiny["gen"].diffusion.np["sqrt_recipm1_ab"][0]     # √((1 − ᾱ₁)/ᾱ₁)
    bound = scale * (eps.abs().max() + eps_hat.abs().max()) + 1e-5
    assert bound < 0.2 and (out - mix).abs().max() <= bound
    assert (out - a).abs().max() > 0.3      # the bound is tight enough to tell the mix from an input


def test_shared_noise_lambda0_depends_only_on_a(tiny):
    a, b = _inputs(tiny)
    other_b = -b.flip(-1)
    lams = [0.0, 0.5, 1.0]
    one, two = _fuse(tiny, a, b, lams, 60), _fuse(tiny, a, other_b, lams, 60)
    assert torch.equal(one[:, 0], two[:, 0])              # λ = 0: b is not used at all
    assert not torch.allclose(one[:, 1], two[:, 1])       # λ = ½: it is
    assert torch.equal(_fuse(tiny, -a, b, lams, 60)[:, 2], one[:, 2])    # λ = 1 ignores a
    # Independent noise draws ε_a first, so λ = 0 is the same fusion; in between the noise differs.
    ind = _fuse(tiny, a, b, lams, 60, noise="independent")
    assert torch.equal(ind[:, 0], one[:, 0]) and not torch.allclose(ind[:, 1], one[:, 1])


def test_seeds_differ_and_do_not_depend_on_batch(tiny):
    a, b = _inputs(tiny)
    gen = tiny["gen"]
    sampler = SamplerOptions("ddim", 4, eta=1.0)
    full = fusion.fuse(gen, a, b, FusionOptions((0.25, 0.75), 41), SamplingOptions(3, 3, 4, sampler))  # seeds 3 … 5
    alone = fusion.fuse(gen, a, b, FusionOptions((0.75,), 41), SamplingOptions(1, 5, 1, sampler))        # seed 5
    assert torch.allclose(full[2, 1], alone[0, 0], atol=1e-6)
    assert not torch.allclose(full[0, 0], full[1, 0])     # --n gives different fusions


def test_slerp():
    z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(fusion.slerp(z0, z1, 0.0), z0) and torch.allclose(fusion.slerp(z0, z1, 1.0), z1)
    mid = fusion.slerp(z0, z1, 0.5)
    assert torch.allclose(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))   # on the circle, not the chord
    assert torch.allclose(fusion.slerp(z0, z0, 0.3), z0)                   # θ = 0: no division by sin 0


def test_inversion_round_trip(tiny):
    # DDIM inversion with all T = 100 steps, then η = 0 decoding with the same steps. For an ε̂ that varies slowly
    # along the path the round trip is exact up to discretisation (tests/test_samplers.py); this 3-step model's ε̂
    # still swings with x (it has not learnt t yet), which costs accuracy: measured endpoint PSNR 29 and 32 dB
    # (mean |error| 0.06 and 0.04 in [−1, 1]). Bound: PSNR > 24 dB and mean |error| < 0.1; the inputs themselves are
    # 8 dB apart.
    a, b = _inputs(tiny)
    options = SamplingOptions(n=1, sampler=SamplerOptions("ddim", T, clip_x0=False))
    frames, latents = fusion.interpolate(tiny["gen"], a, b, InterpolationOptions(frames=3), options)
    assert frames.shape == (3, 3, SIZE, SIZE) and latents.shape == (2, 3, SIZE, SIZE)
    assert (frames[0] - a).abs().mean() < 0.1 and (frames[-1] - b).abs().mean() < 0.1
    a8, b8, f8 = to_pixels(a[None])[0], to_pixels(b[None])[0], to_pixels(frames)
    assert fusion.psnr(f8[0], a8) > 24 and fusion.psnr(f8[-1], b8) > 24
    assert fusion.psnr(f8[1], a8) < 15 and fusion.psnr(f8[1], b8) < 15     # the middle frame is neither input


def test_interpolation_never_clips(tiny):
    """The inversion cannot clip and a clipping decoder breaks the round trip, so the frames are the unclipped
    decoding whether or not the options ask for clipping (sample.py --interpolate with or without --no-clip)."""
    a, b = _inputs(tiny)
    gen = tiny["gen"]
    runs = [fusion.interpolate(gen, a, b, InterpolationOptions(frames=2),
                               SamplingOptions(n=1, sampler=SamplerOptions("ddim", 10, clip_x0=clip)))
            for clip in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    # A clipping decoder would have given other frames from these latents, so the check above can fail.
    clipped = samplers.sample(gen.diffusion, gen.network_fn(None), SamplerOptions("ddim", 10, clip_x0=True),
                              ImageNoise([0, 0], a.shape, "cpu"), x_start=runs[0][1])
    assert not torch.allclose(clipped, runs[0][0], atol=1e-3)


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_script_fusion_strip_layout(tiny, tmp_path, capsys):
    out = tmp_path / "f"
    lams = ["0", "0.5", "1"]
    code, stdout, err = run_script(sample, ["--ckpt", tiny["ckpt"], "--fuse", tiny["a"], tiny["b"], "--lam", *lams,
                                            "--t", "20", "--n", "2", "--seed", "7", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted([f"fused_seed{s:06d}_lam{x}.png" for s in (7, 8) for x in lams] +
                                             ["strip_seed000007.png", "strip_seed000008.png"])
    assert "t = 20 of T = 100" in stdout
    a8, b8 = (to_pixels(x[None])[0] for x in _inputs(tiny))
    pad = 2
    s = _png(out / "strip_seed000008.png")
    # One row: a | three fusions | b, 2-px white borders between and around.
    assert s.shape == (SIZE + 2 * pad, pad + 5 * (SIZE + pad), 3)
    cells = [s[pad: pad + SIZE, pad + k * (SIZE + pad): pad + k * (SIZE + pad) + SIZE] for k in range(5)]
    assert np.array_equal(cells[0], a8) and np.array_equal(cells[4], b8)
    for k, x in enumerate(lams):
        assert np.array_equal(cells[k + 1], _png(out / f"fused_seed000008_lam{x}.png"))
    assert (s[:pad] == 255).all()
    assert (s[:, pad + SIZE: 2 * pad + SIZE] == 255).all()


def test_script_single_fusion_and_interpolation(tiny, tmp_path, capsys):
    out = tmp_path / "one"
    code, stdout, err = run_script(sample, ["--ckpt", tiny["ckpt"], "--fuse", tiny["a"], tiny["b"], "--out", str(out),
                                            "--sampler", "ddpm", "--t", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["fused.png", "strip.png"] and "t = 3 of T = 100" in stdout   # --n default 1
    out = tmp_path / "interp"
    code, stdout, err = run_script(sample, ["--ckpt", tiny["ckpt"], "--interpolate", tiny["a"], tiny["b"],
                                            "--frames", "4", "--steps", "10", "--out", str(out), "--device", "cpu"],
                                   capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == [f"frame_{k:03d}.png" for k in range(4)] + ["strip.png"]
    assert _png(out / "strip.png").shape == (SIZE + 4, 2 + 6 * (SIZE + 2), 3)
    assert "PSNR" in stdout


@pytest.fixture(scope="module")
def other_ckpts(tmp_path_factory, cifar_root):
    """A 1-step class-conditional diffusion model (cat, dog) and a 1-step DCGAN."""
    root = tmp_path_factory.mktemp("fusion_other")
    _train(["--dataset", "cifar", "--data-dir", cifar_root, "--class", "cat", "dog", "--conditional",
            "--image-size", "32", "--out", str(root / "cond"), "--steps", "1", *MICRO_FLAGS,
            "--sample-every", "1000", "--save-every", "1000"])
    data = make_image_folder(str(root / "imgs"), n=4, size=32)
    _train(["--model", "dcgan", "--dataset", "folder", "--data-dir", data, "--image-size", "32",
            "--out", str(root / "gan"), "--steps", "1", "--batch-size", "4", "--grid-size", "4", "--device", "cpu",
            "--sample-every", "1000", "--save-every", "1000"])
    return dict(cond=str(root / "cond" / "ckpt.pt"), gan=str(root / "gan" / "ckpt.pt"))


def test_class_model_needs_class_and_dcgan_is_refused(tiny, other_ckpts, tmp_path, capsys):
    base = ["--out", str(tmp_path / "o"), *FAST]
    for mode in ("--fuse", "--interpolate"):
        code, _, err = run_script(sample, ["--ckpt", other_ckpts["cond"], mode, tiny["a"], tiny["b"], *base], capsys)
        assert_user_error(code, err, "--class", "cat")
        code, _, err = run_script(sample, ["--ckpt", other_ckpts["gan"], mode, tiny["a"], tiny["b"],
                                           "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
        assert_user_error(code, err, f"{mode} needs a diffusion model")
    code, stdout, err = run_script(sample, ["--ckpt", other_ckpts["cond"], "--fuse", tiny["a"], tiny["b"],
                                            "--class", "dog", "--cfg-scale", "2", *base], capsys)
    assert code == 0, err


@pytest.mark.parametrize("extra, words", [
    (["--fuse", "A", "missing.png"], ["missing.png", "does not exist"]),
    (["--fuse", "A", "BAD"], ["cannot read image"]),
    (["--fuse", "A", "B", "--lam", "0.5", "1.5"], ["--lam", "between 0.0 and 1.0", "1.5"]),
    (["--fuse", "A", "B", "--lam", "-0.1"], ["--lam", "between 0.0 and 1.0", "-0.1"]),
    (["--fuse", "A", "B", "--lam", "nan"], ["--lam"]),
    (["--fuse", "A", "B", "--t", "0"], ["--t", "1 … 100"]),
    (["--fuse", "A", "B", "--t", "101"], ["--t", "1 … 100"]),
    (["--fuse", "A"], ["two images", "got 1"]),
    (["--fuse", "A", "B", "A"], ["two images", "got 3"]),
    (["--interpolate", "A", "B", "A"], ["two images", "got 3"]),
    (["--interpolate", "A", "B", "--frames", "1"], ["--frames", "between 2"]),
    (["--interpolate", "A", "B", "--frames", "1001"], ["--frames", "and 1000"]),
    (["--interpolate", "A", "B", "--inversion-steps", "0"], ["--inversion-steps"]),
    # a sampler that takes --steps (FAST's), so that not being DDIM is all that is wrong (ddpm with --steps is
    # refused for that first: tests/test_sample_hardening.py)
    (["--interpolate", "A", "B", "--sampler", "heun"], ["deterministic", "--sampler"]),
    (["--interpolate", "A", "B", "--lam", "0.5"], ["--lam", "only apply to --fuse"]),
    (["--interpolate", "A", "B", "--n", "3"], ["--n"]),
    (["--fuse", "A", "B", "--frames", "3"], ["--frames", "only apply to --interpolate"]),
    (["--fuse", "A", "B", "--interpolate", "A", "B"], ["one at a time"]),
    (["--fuse", "A", "B", "--class", "cat"], ["unconditional"]),
])
def test_bad_input(tiny, tmp_path, capsys, extra, words):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    names = {"A": tiny["a"], "B": tiny["b"], "BAD": str(bad), "missing.png": str(tmp_path / "missing.png")}
    argv = ["--ckpt", tiny["ckpt"], *[names.get(x, x) for x in extra], "--out", str(tmp_path / "o"), *FAST]
    code, _, err = run_script(sample, argv, capsys)
    assert_user_error(code, err, *words)
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")    # nothing written on error
