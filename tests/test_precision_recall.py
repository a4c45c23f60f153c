"""Precision/recall (Kynkäänniemi et al. 2019, k = 3) and the memorisation check (tinyddpm/neighbours.py), alone and
inside `sample.py --report` (issue 15)."""
import json

import numpy as np
import pytest
from PIL import Image

import sample
from tests.helpers import run_script
from tests.test_report import _report, _train, fake  # noqa: F401 (fake: a pytest fixture)
from tinyddpm import data as data_mod
from tinyddpm import neighbours as nb

RNG = np.random.default_rng(0)


def brute_distances(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of a handful of numbers, so every chunked path is taken many times."""
    monkeypatch.setattr(nb, "BLOCK_ELEMENTS", 37)


def test_blocked_distances_equal_brute_force(tiny_blocks):
    a, b = RNG.standard_normal((23, 5)), RNG.standard_normal((31, 5))
    d = brute_distances(a, b)
    dist, index = nb.nearest(a, b)
    np.testing.assert_allclose(dist, d.min(1), rtol=1e-10)
    assert (index == d.argmin(1)).all()
    radii = nb.kth_neighbour_radii(a, 3)
    np.testing.assert_allclose(radii, np.sort(brute_distances(a, a), axis=1)[:, 3], rtol=1e-10)
    p, r = nb.precision_recall(a, b)
    rb = np.sort(brute_distances(b, b), axis=1)[:, 3]
    assert p == pytest.approx((d.T <= radii[None]).any(1).mean()) and r == pytest.approx((d <= rb[None]).any(1).mean())
    pixels = RNG.integers(0, 256, (9, 4, 4, 3), dtype=np.uint8)  # uint8 images: no overflow, exact copies at 0
    dist, index = nb.nearest(pixels[:4], pixels)
    assert (dist == 0).all() and (index == np.arange(4)).all()


def test_identical_sets_give_one_and_far_sets_zero():
    x = RNG.standard_normal((200, 16))
    assert nb.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert nb.precision_recall(x, x + 100.0) == (0.0, 0.0)
    # A subset of the real set is all realistic (precision 1) but covers only part of it (recall < 1).
    p, r = nb.precision_recall(x, x[:50])
    assert p == 1.0 and r < 0.9
    # Too few rows for a 3rd neighbour: no figure rather than a wrong one.
    assert nb.precision_recall(x[:3], x) == (None, None)


def test_memorisation_on_gaussians():
    train, test = RNG.standard_normal((2000, 8)), RNG.standard_normal((1000, 8))
    copies = nb.memorisation(train[:300], test, train)
    assert copies.fraction == 1.0 and copies.distance.max() < 1e-6  # 0 up to the round-off of |x|² + |y|² − 2x·y
    honest = nb.memorisation(RNG.standard_normal((2000, 8)), test, train)
    assert 0.02 < honest.fraction < 0.09  # 5 % by construction, up to sampling noise
    assert honest.threshold == pytest.approx(np.percentile(nb.nearest(test, train)[0], 5))


def test_memorisation_on_cifar_cats(cifar_root):
    """Pixels of real cats: train cats offered as samples are flagged almost all, unseen test cats about 5 %."""
    train, _ = data_mod.load_cifar10(cifar_root, "train", ["cat"])
    test, _ = data_mod.load_cifar10(cifar_root, "test", ["cat"])
    train = train[:1500]
    threshold_set, unseen = test[:500], test[500:]
    assert nb.memorisation(train[:200], threshold_set, train).fraction >= 0.95
    assert 0.01 <= nb.memorisation(unseen, threshold_set, train).fraction <= 0.10


def test_closest_pairs_grid_order():
    gen = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (31, 20, 10)])
    train = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (11, 29)])
    found = nb.memorisation(gen, train, train)
    pairs = nb.closest_pairs(gen, train, [found, found], pairs=2)
    # Row by row: (gen, its nearest train) for each space, nearest first: 10 (1 from 11), then 31 (2 from 29).
    assert [int(p[0, 0, 0]) for p in pairs] == [10, 11, 10, 11, 31, 29, 31, 29]


@pytest.fixture(scope="module")
def cat_ckpt(tmp_path_factory, cifar_root):
    return _train(tmp_path_factory.mktemp("pr") / "cat", ["--dataset", "cifar", "--data-dir", cifar_root,
                                                          "--image-size", "32", "--class", "cat"])


def test_report_flags_a_model_that_returns_training_images(cat_ckpt, fake, cifar_root, tmp_path, capsys,  # noqa: F811
                                                           monkeypatch):
    """A "model" whose samples are its first N training cats: FID near the floor, and every sample flagged."""
    n, load = 8, data_mod.load_cifar10

    def small(root, split="train", classes=(), **kw):
        images, labels = load(root, split, classes, **kw)
        keep = 64 if split == "test" else 200
        return images[:keep], labels[:keep]

    monkeypatch.setattr(data_mod, "load_cifar10", small)
    from tinyddpm.generate import LoadedModel

    train_cats = small(cifar_root, "train", [3])[0]
    monkeypatch.setattr(LoadedModel, "images",
                        lambda self, cond, options, *a, **k: train_cats[10:10 + len(options.seeds())].copy())
    code, out, err = run_script(sample, _report(cat_ckpt, tmp_path, "--data-dir", cifar_root, "--n", str(n)),
                                capsys)
    assert code == 0, err
    with open(tmp_path / "rep" / "report.json") as f:
        (row,) = json.load(f)["results"]
    m = row["memorisation"]
    assert m["train_reference"] == "cifar10:cat:train" and m["train_images"] == 200 and m["percentile"] == 5
    assert m["inception"]["fraction"] == 1.0 and m["pixels"]["fraction"] == 1.0
    assert m["pixels"]["median_nearest_distance"] == 0.0
    for key in ("precision", "recall", "floor_precision", "floor_recall"):
        assert 0.0 <= row[key] <= 1.0
    assert "100.0 % / 100.0 %" in out and "| precision (floor) |" in out
    grid = np.asarray(Image.open(tmp_path / "rep" / m["grid"]))
    pad, side = 2, 32
    assert grid.shape == (pad + n * (side + pad), pad + 4 * (side + pad), 3)  # 8 rows: gen | train, twice
    first_gen, first_train = (grid[pad:pad + side, pad + c * (side + pad):pad + c * (side + pad) + side]
                              for c in (0, 1))
    assert (first_gen == first_train).all()  # a sample and the training image it copies
