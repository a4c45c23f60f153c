"""Fréchet distance and KID: analytic cases, the scipy sqrtm route, singular covariances."""
import warnings

import numpy as np
import pytest
import scipy.linalg

from tinyddpm.distance import frechet_distance, kernel_inception_distance, mmd2_unbiased


def random_spd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def sqrtm_route(mu1, s1, mu2, s2):
    """pytorch-fid's formula with scipy.linalg.sqrtm (without its removed disp= argument)."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(64), random_spd(rng, 64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equals_sqrtm_route(seed):
    rng = np.random.default_rng(seed)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.1
    s1, s2 = random_spd(rng, d), random_spd(rng, d) * 2.0
    ours, ref = frechet_distance(mu1, s1, mu2, s2), sqrtm_route(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_diagonal_closed_form():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_singular_covariances_no_nan_and_warn():
    rng = np.random.default_rng(5)
    d, n = 96, 30  # fewer samples than dimensions: rank-deficient covariances
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with pytest.warns(UserWarning, match="KID"):
        fd = frechet_distance(x.mean(0), s1, y.mean(0), s2, n1=n, n2=n)
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(sqrtm_route(x.mean(0), s1, y.mean(0), s2), rel=1e-4)


def test_no_warning_for_full_rank():
    rng = np.random.default_rng(6)
    s = random_spd(rng, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(np.zeros(32), s, np.ones(32), s, n1=1000, n2=1000)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_same_distribution_near_zero_and_different_positive():
    rng = np.random.default_rng(7)
    d = 64
    a, b = rng.standard_normal((400, d)), rng.standard_normal((400, d))
    c = rng.standard_normal((400, d)) * 1.5 + 0.5
    same, same_std = kernel_inception_distance(a, b, subsets=10, subset_size=200)
    diff, _ = kernel_inception_distance(a, c, subsets=10, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert diff > 0.1 and diff > 20 * abs(same)


def test_mmd_unbiased_expectation():
    # Unbiased: for two samples of the same distribution the average over many draws is ≈ 0 (can be negative).
    rng = np.random.default_rng(8)
    vals = [mmd2_unbiased(rng.standard_normal((50, 8)), rng.standard_normal((50, 8))) for _ in range(200)]
    assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(len(vals))
    assert min(vals) < 0 < max(vals)


def test_kid_of_whole_sets_is_one_mmd():
    """With subsets as large as both sets every subset is the full set: one MMD², std 0 (not 100 equal values)."""
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((30, 8)) + 0.3
    mean, std = kernel_inception_distance(a, b, subsets=5, subset_size=100)
    assert mean == pytest.approx(mmd2_unbiased(a, b), rel=1e-12) and std == 0.0
    _, std_smaller = kernel_inception_distance(a, b, subsets=5, subset_size=20)
    assert std_smaller > 0
