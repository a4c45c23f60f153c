"""The same seed gives the same images as the code that froze tests/fixtures/same_images/ (tests/same_images.py):
the default sampler with autoguidance, a v-objective model, classifier-free guidance, DDIM with η, DDPM, Karras
DPM-Solver++, fusion and interpolation, each run through sample.py on a checkpoint made from fixed seeds.

Equal up to one 8-bit level in at most MAX_DIFFERENT of the pixels: oneDNN picks other convolution kernels on
other CPUs (AVX2 or AVX-512), whose float32 sums differ in the last bits, and a pixel on a rounding boundary can
move by one level. Any change to a sampler, a schedule or the denoiser moves most pixels by far more."""
import os

import numpy as np
import pytest
from PIL import Image

from tests.same_images import CASES, FIXTURES, run_case

MAX_DIFFERENT = 0.01  # fraction of pixel values allowed to differ, by one level at most


def frozen(case):
    folder = os.path.join(FIXTURES, case)
    return {f: np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("same"))


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_images(case, workdir):
    want, got = frozen(case), run_case(case, workdir)
    assert sorted(got) == sorted(want)
    for name, img in want.items():
        diff = np.abs(got[name].astype(np.int16) - img.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() <= MAX_DIFFERENT, (case, name, diff.max(), (diff > 0).mean())
