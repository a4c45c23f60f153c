"""Small shared pieces for the tests: a folder of images and in-process script runs."""
import os

import numpy as np
from PIL import Image

# A U-Net small enough to train for a few hundred steps inside a test.
MICRO_FLAGS = ["--preset", "tiny", "--base-channels", "32", "--channel-mults", "1", "1", "--num-res-blocks", "1",
               "--attn-resolutions", "--timesteps", "100", "--batch-size", "4", "--warmup", "1",
               "--log-every", "10", "--grid-size", "4", "--grid-steps", "3", "--device", "cpu"]


def make_image_folder(path, n=4, size=16, seed=0):
    """n distinct, smooth colour images (size×size PNGs) in `path`."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = rng.uniform(0, 255, (2, 3))
        img = (c[0] * xx[..., None] + c[1] * (1 - yy[..., None])).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(path, f"img{i}.png"))
    return path


def run_script(module, argv, capsys):
    """Run a script's main in-process through run_cli: (exit code, stdout, stderr)."""
    from tinyddpm.errors import run_cli

    code = run_cli(module.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *words):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
