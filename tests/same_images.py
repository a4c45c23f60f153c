"""The fixed checkpoints and commands behind tests/test_same_images.py (and the script that froze their output).

A checkpoint here is made from a seed alone, not trained: the `tiny` preset's U-Net with its own initialisation
(torch's CPU generator is the same on every machine) plus seeded noise on every weight, so the network's output is
far from zero and every sampler has something to follow. Its autoguidance snapshot is the same network with other
noise. Nothing is stored but the images: `python tests/same_images.py` rewrites tests/fixtures/same_images/ and is
run only when a change is *meant* to change images (say so in the commit).
"""
import os
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "same_images")
NOISE_STD = 0.05          # seeded noise added to every weight: the output conv starts at zero otherwise
SEEDS = {"ema": 11, "guide": 12}
IMAGE_SEED = 3            # the test images A and B
IMAGE_SIZE = 32


def fixed_checkpoint(path, conditional=False, objective="eps"):
    """Write a tinyddpm checkpoint (tiny preset, 32 px, the given objective) made from fixed seeds to `path`."""
    from tinyddpm.checkpoint import save_checkpoint
    from tinyddpm.config import build_config
    from tinyddpm.models import build_unet

    classes = ("cat", "frog") if conditional else ("cat",)
    cfg = build_config("tiny", {"data": {"classes": classes}, "cond": {"conditional": conditional},
                                 "diffusion": {"objective": objective}})
    labels = {"kind": "class", "names": list(classes)} if conditional else {"kind": "none", "names": []}
    weights = {}
    for name, seed in SEEDS.items():
        torch.manual_seed(seed)
        model = build_unet(cfg, labels)
        g = torch.Generator().manual_seed(seed)
        weights[name] = {k: (v + NOISE_STD * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                         for k, v in model.state_dict().items()}
    save_checkpoint(path, dict(kind="ddpm", config=cfg.to_dict(), labels=labels, step=8000,
                               models=dict(model=weights["ema"], ema=weights["ema"],
                                           guide=dict(step=2000, weights=weights["guide"])),
                               optimizers={}))
    return path


def input_images(folder):
    """Two smooth 32-px RGB images A and B (a.png, b.png) for fusion and interpolation."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(IMAGE_SEED)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    paths = []
    for name in ("a", "b"):
        c = rng.uniform(0, 255, (3, 3))
        img = c[0] * xx[..., None] + c[1] * (1 - yy[..., None]) + c[2] * (xx * yy)[..., None] / 2
        paths.append(os.path.join(folder, f"{name}.png"))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


# name → (checkpoint: "uncond", "cond" (cat, frog) or "v" (v objective), sample.py flags after --ckpt/--out; {a}, {b}: the input images)
CASES = {
    "default": ("uncond", ["--n", "6", "--batch-size", "4", "--seed", "3"]),
    "default-v": ("v", ["--n", "3"]),
    "class-cfg": ("cond", ["--n", "4", "--class", "frog", "cat", "--cfg-scale", "3"]),
    "ddim-eta": ("uncond", ["--n", "2", "--sampler", "ddim", "--steps", "10", "--eta", "0.5", "--autoguidance", "1"]),
    "ddpm": ("uncond", ["--fuse", "{a}", "{b}", "--sampler", "ddpm", "--t", "60"]),  # DDPM's steps from t = 60
    "dpmpp-karras": ("uncond", ["--n", "2", "--sampler", "dpmpp-2m", "--steps", "10", "--spacing", "karras"]),
    "fuse": ("uncond", ["--fuse", "{a}", "{b}", "--lam", "0.3", "0.7", "--n", "2"]),
    "interpolate": ("uncond", ["--interpolate", "{a}", "{b}", "--frames", "3", "--steps", "10"]),
}


def run_case(name, workdir):
    """Run case `name` with sample.py in-process; returns {file name: uint8 [H, W, 3]} of the PNGs it wrote."""
    sys.path.insert(0, ROOT)
    import sample
    from tinyddpm.errors import run_cli

    which, flags = CASES[name]
    ckpt = os.path.join(workdir, f"ckpt-{which}.pt")
    if not os.path.exists(ckpt):
        fixed_checkpoint(ckpt, conditional=which == "cond", objective="v" if which == "v" else "eps")
    a, b = input_images(os.path.join(workdir, "inputs"))
    out = os.path.join(workdir, name)
    argv = ["--ckpt", ckpt, "--out", out, "--device", "cpu", *[f.format(a=a, b=b) for f in flags]]
    code = run_cli(sample.main, argv)
    assert code == 0, (name, code)
    return {f: np.asarray(Image.open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.endswith(".png")}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            for fname, img in run_case(case, tmp).items():
                os.makedirs(os.path.join(FIXTURES, case), exist_ok=True)
                Image.fromarray(img).save(os.path.join(FIXTURES, case, fname))
            print(case, "written")
