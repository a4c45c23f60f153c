"""Streaming statistics, the pytorch-fid .npz format, input resolution and the cache (no Inception needed)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tinyddpm import sources
from tinyddpm import statistics as st
from tinyddpm.errors import UserError
from tinyddpm.inception import FIDInceptionV3


def test_running_stats_equal_numpy_in_batches():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((503, 16)) * 0.1 + 5.0  # large mean, small spread: the cancellation-prone case
    acc = st.RunningStats()
    for i in range(0, len(x), 50):
        acc.update(x[i:i + 50].astype(np.float32))
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(acc.mean(), x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.cov(), np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-13)
    mu, sigma = st.statistics_from_features(x32)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-13)


def test_stats_round_trip_pytorch_fid_format(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = rng.standard_normal(8), np.cov(rng.standard_normal((20, 8)), rowvar=False)
    path = str(tmp_path / "a.npz")
    sources.save_statistics(path, mu, sigma)
    with np.load(path) as f:  # what pytorch-fid does: f["mu"][:], f["sigma"][:]
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"][:], mu)
        np.testing.assert_array_equal(f["sigma"][:], sigma)
    theirs = str(tmp_path / "theirs.npz")
    np.savez_compressed(theirs, mu=mu.astype(np.float32), sigma=sigma)  # pytorch-fid's --save-stats
    mu2, sigma2 = sources.load_statistics(theirs)
    np.testing.assert_allclose(mu2, mu, rtol=1e-6)
    src = sources.resolve_source(theirs)
    # Kept as stored: distance.py ties its null-space tolerance to the precision a covariance was saved in.
    assert src.kind == "stats" and (src.mu.dtype, src.sigma.dtype) == (np.float32, np.float64)


def test_save_never_overwrites_without_force(tmp_path):
    path = tmp_path / "a.npz"
    path.write_bytes(b"user's file")
    with pytest.raises(UserError, match="--force"):
        sources.save_statistics(str(path), np.zeros(2), np.eye(2))
    assert path.read_bytes() == b"user's file"
    sources.save_statistics(str(path), np.zeros(2), np.eye(2), force=True)
    assert sources.load_statistics(str(path))[1].shape == (2, 2)
    with pytest.raises(UserError, match=".npz"):
        sources.save_statistics(str(tmp_path / "a.stats"), np.zeros(2), np.eye(2))


@pytest.mark.parametrize("content,match", [
    (dict(mean=np.zeros(3), cov=np.eye(3)), "needs mu and sigma|expected mu and sigma"),
    (dict(mu=np.zeros(3), sigma=np.eye(4)), "not a mean"),
    (dict(mu=np.zeros((3, 3)), sigma=np.eye(3)), "not a mean"),
    (dict(mu=np.zeros(3)), "needs mu and sigma"),
    (dict(mu=np.full(3, np.nan), sigma=np.eye(3)), "NaN"),
])
def test_bad_stats_files(tmp_path, content, match):
    path = str(tmp_path / "s.npz")
    np.savez(path, **content)
    with pytest.raises(UserError, match=match):
        sources.resolve_source(path)


def test_resolve_source_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sources.resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        sources.resolve_source(str(tmp_path / "empty"))
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    with pytest.raises(UserError, match="only 1 image"):
        sources.resolve_source(str(tmp_path / "one"))
    np.save(tmp_path / "f.npy", np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        sources.resolve_source(str(tmp_path / "f.npy"))
    np.save(tmp_path / "s.npy", np.zeros((4, 8), np.uint8))
    with pytest.raises(UserError, match="shape"):
        sources.resolve_source(str(tmp_path / "s.npy"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read"):
        sources.resolve_source(str(tmp_path / "junk.npz"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="not a folder"):
        sources.resolve_source(str(tmp_path / "x.txt"))


def test_arrays_in_every_layout(tmp_path):
    rng = np.random.default_rng(2)
    nhwc = rng.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    assert np.array_equal(sources.resolve_source(nhwc.transpose(0, 3, 1, 2)).array, nhwc)  # NCHW
    gray = sources.resolve_source(nhwc[..., 0]).array
    assert gray.shape == (3, 5, 6, 3) and np.array_equal(gray[..., 2], nhwc[..., 0])
    np.savez(tmp_path / "imgs.npz", images=nhwc)
    assert np.array_equal(sources.resolve_source(str(tmp_path / "imgs.npz")).array, nhwc)
    np.save(tmp_path / "imgs.npy", nhwc)
    assert np.array_equal(sources.resolve_source(str(tmp_path / "imgs.npy")).array, nhwc)


def test_folder_decoding_all_kinds_and_bad_files(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.new("L", (10, 12), 77).save(d / "sub" / "gray.JPG")
    Image.new("RGBA", (10, 12), (255, 0, 0, 0)).save(d / "rgba.PNG")  # fully transparent: composited on white
    Image.new("P", (7, 7)).save(d / "palette.bmp")
    (d / "broken.png").write_bytes(b"not an image")
    src = sources.resolve_source(str(d))
    assert len(src) == 4
    with pytest.raises(UserError, match="broken.png.*--skip-bad"):
        list(src.batches())
    skipped = []
    batches = list(src.batches(batch_size=4, skip_bad=True, report=skipped.append))
    assert skipped == [1] and sum(len(b) for b in batches) == 3
    # Mixed sizes are resized to 299×299 in the loader; the network's own resize is then the identity.
    assert all(isinstance(b, torch.Tensor) and b.shape[1:] == (3, 299, 299) for b in batches)
    assert torch.equal(FIDInceptionV3.preprocess(None, batches[0]), 2 * batches[0] - 1)


def test_same_size_images_stay_uint8(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    batches = list(sources.resolve_source(str(tmp_path)).batches(batch_size=2, num_workers=1))
    assert [b.dtype for b in batches] == [np.uint8] * 3
    assert np.array_equal(np.concatenate(batches), arr)


class FakeModel(torch.nn.Module):
    """Stands in for the Inception: features = per-channel means (fast), with a weights id for the cache key."""
    weights_id = "fake-0"

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


QUIET = st.Reading(progress=False)


def test_measure_streams_and_caches(tmp_path):
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    feats = st.features_from_uint8(arr, FakeModel(), batch_size=7)
    mu, sigma = st.statistics_from_uint8(iter([arr[:10], arr[10:]]), FakeModel(), batch_size=7)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-6, atol=1e-12)
    cache = str(tmp_path / "cache")
    m1 = st.measure(sources.resolve_source(arr), FakeModel(), batch_size=8, cache_dir=cache, reading=QUIET)
    assert m1.n == 30 and len(os.listdir(cache)) == 1
    np.testing.assert_allclose(m1.mu, mu)
    m2 = st.measure(sources.resolve_source(arr), FakeModel(), cache_dir=cache, reading=QUIET)
    assert m2.n == 30 and np.array_equal(m2.sigma, m1.sigma)  # a cache hit: nothing recomputed
    other = type("Other", (FakeModel,), {"weights_id": "fake-1"})()
    st.measure(sources.resolve_source(arr), other, cache_dir=cache, reading=QUIET)
    assert len(os.listdir(cache)) == 2  # other weights, other key
    m3 = st.compute_statistics(arr[:10], model=FakeModel())
    np.testing.assert_allclose(m3[0], st.statistics_from_features(feats[:10])[0], rtol=1e-6)
