"""Numeric edges of the Fréchet distance and KID (issue 17, item 12): inputs that are not a covariance are refused
with one line, round-off is tolerated, and the LAPACK routes equal scipy's sqrtm to ~1e-10 relative."""
import warnings

import numpy as np
import pytest
import scipy.linalg

import fid
from helpers import assert_user_error, run_script
from tinyddpm.distance import PSD_RTOL, BadStatistics, frechet_distance, kernel_inception_distance
from tinyddpm.errors import UserError

D = 64


def random_spd(rng, d=D, jitter=0.1):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + jitter * np.eye(d)


def low_rank_plus_jitter(rng, d=D, rank=D // 4, jitter=1e-6):
    """Like real Inception statistics: a few strong directions and a nearly flat rest."""
    a = rng.standard_normal((d, rank)) * rng.uniform(0.1, 2, rank)
    return a @ a.T / rank + jitter * np.eye(d)


def sqrtm_route(mu1, s1, mu2, s2):
    """pytorch-fid's formula with scipy.linalg.sqrtm."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def quiet_fd(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return frechet_distance(*args)


# ---- the LAPACK routes against sqrtm ------------------------------------------------------------------------------
ROUTES = ["full", "low-rank+jitter", "full vs low-rank", "singular both"]


@pytest.mark.parametrize("seed, kind", list(enumerate(ROUTES)))
def test_equals_sqrtm_to_1e10(seed, kind):
    rng = np.random.default_rng(seed)
    d = 256
    if kind == "singular both":  # fewer samples than features: the eigh route of a rank-deficient Σ1
        x, y = rng.standard_normal((200, d)), rng.standard_normal((200, d)) * 1.3 + 0.2
        (mu1, s1), (mu2, s2) = [(z.mean(0), np.cov(z, rowvar=False)) for z in (x, y)]
        # sqrtm itself is only accurate to ~sqrt(eps) on the null space; compare with a looser tolerance
        assert quiet_fd(mu1, s1, mu2, s2) == pytest.approx(sqrtm_route(mu1, s1, mu2, s2), rel=1e-6)
        return
    s1 = random_spd(rng, d) if kind != "low-rank+jitter" else low_rank_plus_jitter(rng, d)
    s2 = random_spd(rng, d) * 2 if kind == "full" else low_rank_plus_jitter(rng, d)
    mu1, mu2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
    assert quiet_fd(mu1, s1, mu2, s2) == pytest.approx(sqrtm_route(mu1, s1, mu2, s2), rel=1e-10)
    assert quiet_fd(mu2, s2, mu1, s1) == pytest.approx(sqrtm_route(mu1, s1, mu2, s2), rel=1e-10)  # symmetric


def test_zero_covariance_and_identical_singular():
    """All images alike (Σ = 0) and a rank-deficient Σ against itself: finite, and 0 for identical inputs."""
    rng = np.random.default_rng(1)
    s = np.cov(rng.standard_normal((10, D)), rowvar=False)
    mu = np.ones(D)
    assert abs(quiet_fd(mu, s, mu, s)) < 1e-6 * np.trace(s)
    assert quiet_fd(mu, np.zeros((D, D)), mu, s) == pytest.approx(np.trace(s), rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_identical_statistics_give_exactly_zero(seed):
    """Never −0.000000 (round-off of either sign), whatever the route: full rank, singular, stored as float32."""
    rng = np.random.default_rng(seed)
    mu, full, singular = rng.standard_normal(D), random_spd(rng), np.cov(rng.standard_normal((10, D)), rowvar=False)
    for s in (full, singular, full.astype(np.float32), singular.astype(np.float32)):
        fd = quiet_fd(mu, s, mu, s)
        assert fd == 0.0 and f"{fd:.6f}" == "0.000000"


FLOAT32_AGREEMENT = 1e-6  # float32 keeps about 7 significant digits; the FD of a float32 copy agrees to 6


@pytest.mark.parametrize("singular", ["first", "second", "both"])
def test_a_rank_deficient_covariance_stored_as_float32_gives_the_fd_of_its_float64_original(singular):
    """Rounding Σ to float32 (as statistics files often store it) turns its null space into eigenvalues of about
    ±eps32 · ‖Σ‖, whose square roots would bias tr √(Σ1 Σ2). Σ = Q diag(a) Qᵀ commute for one Q, so the FD is
    known exactly: |μ1 − μ2|² + Σ (√a − √b)², with a quarter of the a (or b) nonzero in a singular Σ."""
    rng = np.random.default_rng(7)
    d, rank = 256, 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    if singular in ("first", "both"):
        a[rank:] = 0
    if singular in ("second", "both"):
        b[rng.permutation(d)[rank:]] = 0
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1 = rng.standard_normal(d)
    mu2 = mu1 + 0.1
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for stored in (np.float64, np.float32):
        got = quiet_fd(*(x.astype(stored) for x in (mu1, s1, mu2, s2)))
        assert got == pytest.approx(exact, rel=FLOAT32_AGREEMENT), stored
    assert quiet_fd(mu1, s1.astype(np.float32), mu1, s1.astype(np.float32)) == 0.0


# ---- refused: not a covariance -------------------------------------------------------------------------------------
def assert_refused(match, *args):
    with pytest.raises(BadStatistics, match=match) as e:
        frechet_distance(*args)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)  # library callers and run_cli alike
    assert "\n" not in str(e.value)


def test_not_positive_semidefinite_is_refused():
    rng = np.random.default_rng(2)
    s = random_spd(rng)
    bad = s.copy()
    bad[0, 0] = -5.0  # a negative variance: this kind of sigma gave "FID: -736" with exit 0
    assert_refused("first input's sigma is not positive semi-definite", np.zeros(D), bad, np.zeros(D), s)
    assert_refused("second input's sigma is not positive semi-definite", np.zeros(D), s, np.zeros(D), -s)


def test_round_off_is_tolerated():
    """A rank-deficient covariance stored in float32 has eigenvalues slightly below 0: accepted, same FD."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, D)) @ rng.standard_normal((D, D))
    s = np.cov(x, rowvar=False)
    s32 = s.astype(np.float32).astype(np.float64)
    assert np.linalg.eigvalsh(s32).min() < 0  # round-off really made it indefinite
    other = random_spd(rng)
    assert quiet_fd(x.mean(0), s32, np.zeros(D), other) == pytest.approx(
        quiet_fd(x.mean(0), s, np.zeros(D), other), rel=1e-5)
    # ... but an eigenvalue well below the tolerance is refused
    w, v = np.linalg.eigh(s)
    w[0] = -100 * PSD_RTOL * np.diag(s).max()
    assert_refused("not positive semi-definite", x.mean(0), (v * w) @ v.T, np.zeros(D), other)


def test_complex_sigma_is_refused():
    rng = np.random.default_rng(4)
    s = random_spd(rng)
    assert_refused("first input's sigma is complex", np.zeros(D), s + 0.5j * np.eye(D), np.zeros(D), s)
    assert_refused("second input's mu is complex", np.zeros(D), s, np.zeros(D) + 1j, s)


def test_asymmetric_nan_and_shape_are_refused():
    rng = np.random.default_rng(5)
    s = random_spd(rng)
    skew = s.copy()
    skew[0, 1] += 1.0
    assert_refused("not symmetric", np.zeros(D), skew, np.zeros(D), s)
    nan = s.copy()
    nan[3, 3] = np.nan
    assert_refused("NaN", np.zeros(D), s, np.zeros(D), nan)
    assert_refused("different sizes", np.zeros(D), s, np.zeros(3), np.eye(3))
    assert_refused("not a mean", np.zeros(D), s[:3], np.zeros(D), s)


def test_zero_dimension_statistics_are_refused():
    assert_refused("0 features", np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))


# ---- KID ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, n, match", [
    (dict(subset_size=1), 10, "subsets of at least 2"),
    (dict(subsets=0), 10, "at least 1 subset"),
    (dict(), 1, "at least 2 images on each side"),
])
def test_kid_refuses_what_has_no_unbiased_estimate(kwargs, n, match):
    rng = np.random.default_rng(6)
    with pytest.raises(BadStatistics, match=match):
        kernel_inception_distance(rng.standard_normal((n, 8)), rng.standard_normal((10, 8)), **kwargs)


def test_kid_refuses_mismatched_or_empty_features():
    rng = np.random.default_rng(7)
    with pytest.raises(BadStatistics, match="same d"):
        kernel_inception_distance(rng.standard_normal((10, 8)), rng.standard_normal((10, 9)))
    with pytest.raises(BadStatistics, match="same d"):
        kernel_inception_distance(np.zeros((10, 0)), np.zeros((10, 0)))
    with pytest.raises(BadStatistics, match="complex"):
        kernel_inception_distance(rng.standard_normal((10, 8)) * 1j, rng.standard_normal((10, 8)))


# ---- through fid.py: one line, exit 2 -----------------------------------------------------------------------------
def test_fid_cli_refuses_an_indefinite_sigma_in_one_line(tmp_path, capsys):
    """Positive variances, symmetric, yet an eigenvalue of −(D − 1)/2 + 1: the file checks pass, the distance
    refuses (this kind of sigma printed "FID: -736" with exit 0)."""
    rng = np.random.default_rng(8)
    indefinite = 1.5 * np.eye(D) - 0.5 * np.ones((D, D))
    paths = [str(tmp_path / "bad.npz"), str(tmp_path / "good.npz")]
    np.savez(paths[0], mu=np.zeros(D), sigma=indefinite)
    np.savez(paths[1], mu=np.zeros(D), sigma=random_spd(rng))
    for argv in (paths, paths[::-1]):
        code, out, err = run_script(fid, argv + ["--device", "cpu"], capsys)
        assert_user_error(code, err, "positive semi-definite", "recompute")
        assert "FID:" not in out
