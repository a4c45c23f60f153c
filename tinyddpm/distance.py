"""Fréchet distance between two Gaussians, and the kernel inception distance (KID), in float64.

FD = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2). pytorch-fid takes the last trace from scipy.linalg.sqrtm of the
non-symmetric Σ1 Σ2 (a complex Schur decomposition, slow, and an imaginary part to drop). Here it comes from
eigenvalues: Σ1 Σ2 is similar to the symmetric PSD matrix M = Rᵀ Σ2 R for any R with R Rᵀ = Σ1, so
tr √(Σ1 Σ2) = Σ √λ_i(M). Every step is one of scipy's LAPACK routines on symmetric matrices:
- both full rank (≥ d + 1 images): R is Σ1's Cholesky factor (potrf), M = Rᵀ Σ2 R is formed by sygst (itype 2),
  and syevd gives M's eigenvalues without eigenvectors;
- a singular side (fewer images than features) is factored as F = V √w from its symmetric eigendecomposition
  (syevr), keeping only the r directions with w > 0; with F1 F1ᵀ = Σ1 and F2 F2ᵀ = Σ2 (a full-rank side keeps its
  Cholesky factor), Σ1 Σ2 has the eigenvalues of g gᵀ for g = F1ᵀ F2 [r1, r2], a small matrix.
  Singular means "at the precision the covariance was stored in": rounding a float32 Σ moves its null space to
  eigenvalues of about ±eps32 · ‖Σ‖, whose square roots would otherwise bias the trace. Such a Σ counts as its
  rank-r part (in tr Σ too), so a float32 copy gives the FD of its float64 original.
Inputs that are not a covariance (complex, not symmetric, not positive semi-definite, no features) are refused with
a BadStatistics error: a ValueError for library callers and a UserError, so scripts print it as one line.
"""
import warnings

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from .errors import UserError

SINGULAR_RTOL = 1e-10  # eigenvalues / Cholesky pivots below this × the largest count as zero (a singular covariance)
# Storing Σ rounds each entry by at most eps/2 of itself, so the error E has ‖E‖₂ ≤ ‖E‖_F ≤ eps/2 · ‖Σ‖_F: no
# eigenvalue moves further (Weyl). Eigenvalues below this many times that bound are rounding noise.
STORAGE_NOISE_MARGIN = 2
EPS64 = np.finfo(np.float64).eps
PSD_RTOL = 1e-4  # eigenvalues down to −PSD_RTOL × the largest entry pass as round-off (float32 storage: ~1e-7)
SYMMETRY_RTOL = 1e-6  # |Σ − Σᵀ| allowed, relative to the largest entry (as sources.py checks statistics files)
KID_SUBSETS = 100  # KID defaults of Bińkowski et al. / torch-fidelity
KID_SUBSET_SIZE = 1000
KID_MIN_SUBSET = 2  # the unbiased MMD² averages over pairs i ≠ j within a subset
SIDES = ("first", "second")


class BadStatistics(UserError, ValueError):
    """Statistics or features that no distance can be computed from. The message says which input and why."""


def _real(a, what):
    """float64 array of finite real numbers. A complex one is refused: casting would drop its imaginary part."""
    a = np.asarray(a)
    if np.iscomplexobj(a):
        raise BadStatistics(f"{what} is complex (largest |imaginary part| {np.abs(a.imag).max():.3g}); a mean, "
                            f"covariance or feature is real: recompute the statistics")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise BadStatistics(f"{what} holds {a.dtype} values, not numbers; recompute the statistics")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise BadStatistics(f"{what} contains NaN or inf; recompute the statistics")
    return a


def _cholesky(a):
    """Lower Cholesky factor of a (LAPACK potrf), or None if a is not numerically positive definite."""
    chol, info = lapack.dpotrf(a, lower=1, clean=1)
    return chol if info == 0 else None


def _check_covariance(sigma, what):
    """Symmetric and positive semi-definite up to round-off (SYMMETRY_RTOL, PSD_RTOL × the largest entry).
    Returns (symmetrised sigma, its Cholesky factor or None). One potrf decides PSD: Σ + τI is positive definite
    iff every eigenvalue of Σ exceeds −τ."""
    scale = max(np.abs(sigma).max(), np.finfo(np.float64).tiny)
    asym = np.abs(sigma - sigma.T).max()
    if asym > SYMMETRY_RTOL * scale:
        raise BadStatistics(f"{what} is not symmetric (|Σ − Σᵀ| up to {asym:.3g}, largest entry {scale:.3g}): "
                            f"not a covariance matrix; recompute the statistics")
    sigma = (sigma + sigma.T) / 2  # remove round-off asymmetry
    chol = _cholesky(sigma)
    if chol is None and _cholesky(sigma + PSD_RTOL * scale * np.eye(len(sigma))) is None:
        low = scipy.linalg.eigh(sigma, eigvals_only=True, subset_by_index=[0, 0], check_finite=False)[0]
        raise BadStatistics(f"{what} is not positive semi-definite (eigenvalue {low:.4g}, largest entry {scale:.4g}): "
                            f"not a covariance matrix; recompute the statistics")
    return sigma, chol


def _storage_eps(a):
    """The relative rounding of an array as it was stored: its dtype's eps (integers are exact: float64's)."""
    dtype = np.asarray(a).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else EPS64


def _well_conditioned(chol):
    """A near-singular matrix still factors, with tiny pivots and an inaccurate factor: refuse those."""
    pivots = np.diag(chol) ** 2
    return pivots.min() > SINGULAR_RTOL * pivots.max()


def _factor(sigma, chol, eps):
    """(F [d, r], tr F Fᵀ, full rank?) with F Fᵀ = Σ, Σ stored with relative rounding `eps`. A Σ whose every
    eigenvalue is above its rounding noise (one potrf of Σ − noise·I says so) keeps its Cholesky factor; any other
    keeps the eigenvectors above the noise only: F = V √w, the rest of Σ is its rounding, not data."""
    noise = STORAGE_NOISE_MARGIN * eps / 2 * np.linalg.norm(sigma)
    if chol is not None and _well_conditioned(chol) and _cholesky(sigma - noise * np.eye(len(sigma))) is not None:
        return chol, np.trace(sigma), True
    w, v = scipy.linalg.eigh(sigma, driver="evr", check_finite=False)
    keep = w > max(noise, SINGULAR_RTOL * w.max(), np.finfo(np.float64).tiny)  # Σ = 0 (all images alike): none
    return v[:, keep] * np.sqrt(w[keep]), w[keep].sum(), False


def _eigvals_product(f1, full1, s2, f2, full2):
    """Eigenvalues of Σ1 Σ2 (≥ 0 up to round-off) from the factors F1 F1ᵀ = Σ1, F2 F2ᵀ = Σ2 (_factor)."""
    if full1 and full2:
        m, info = lapack.dsygst(s2, f1, itype=2, lower=1)  # L1ᵀ Σ2 L1 in the lower triangle
        assert info == 0, info
        return scipy.linalg.eigh(m, lower=True, eigvals_only=True, driver="evd", check_finite=False)
    g = f1.T @ f2  # [r1, r2]: Σ1 Σ2 = F1 (g) F2ᵀ has the eigenvalues of g gᵀ, besides zeros
    if g.size == 0:  # a side is 0 (all images alike): Σ1 Σ2 = 0
        return np.zeros(1)
    gram = g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g
    return scipy.linalg.eigh(gram, eigvals_only=True, driver="evd", check_finite=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, n1=None, n2=None):
    """FD between N(mu1, sigma1) and N(mu2, sigma2). n1/n2 (images behind each side, if known) only feed the
    small-sample warning. Warns (UserWarning) when a covariance is singular: FID is then biased, prefer KID.
    Raises BadStatistics for inputs that are not a mean and covariance of the same, non-zero size."""
    mus = [_real(m, f"the {side} input's mu") for m, side in zip((mu1, mu2), SIDES)]
    sigmas = [_real(s, f"the {side} input's sigma") for s, side in zip((sigma1, sigma2), SIDES)]
    for mu, sigma, side in zip(mus, sigmas, SIDES):
        if mu.ndim != 1 or sigma.shape != mu.shape * 2:
            raise BadStatistics(f"the {side} input's mu {mu.shape} and sigma {sigma.shape} are not a mean [d] and "
                                f"covariance [d, d]; recompute the statistics")
    if mus[0].shape != mus[1].shape:
        raise BadStatistics(f"the inputs' statistics have different sizes ({len(mus[0])} vs {len(mus[1])} "
                            f"features); compute both with the same Inception")
    dim = len(mus[0])
    if dim == 0:
        raise BadStatistics("the statistics have 0 features: there is nothing to compare; recompute them")
    (s1, chol1), (s2, chol2) = [_check_covariance(s, f"the {side} input's sigma") for s, side in zip(sigmas, SIDES)]
    (f1, tr1, full1), (f2, tr2, full2) = [_factor(s, chol, _storage_eps(stored)) for s, chol, stored in
                                          ((s1, chol1, sigma1), (s2, chol2, sigma2))]
    eig = _eigvals_product(f1, full1, s2, f2, full2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    small = [n for n in (n1, n2) if n is not None and n <= dim]
    singular = not (full1 and full2)
    if small or singular or eig.min() <= SINGULAR_RTOL * max(eig.max(), np.finfo(np.float64).tiny):
        why = f"{min(small)} images ≤ {dim} features" if small else "a covariance is singular"
        warnings.warn(f"{why}: FID is biased (too high) at small N and not comparable across N; KID (--kid) is "
                      f"the better number there", stacklevel=2)
    diff = mus[0] - mus[1]
    terms = (diff @ diff, tr1, tr2, 2 * tr_covmean)
    fd = terms[0] + terms[1] + terms[2] - terms[3]
    # The terms carry round-off of about dim · eps of their size: a smaller FD (identical inputs) is 0, never −0.
    return float(fd) if fd > dim * EPS64 * sum(terms) else 0.0


def _poly_kernel(x, y):
    """(x·y / d + 1)³, the KID kernel."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """Unbiased MMD² between samples x [m, d] and y [n, d] with the polynomial kernel."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def kernel_inception_distance(feats1, feats2, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """KID: unbiased MMD² averaged over `subsets` random subsets of min(subset_size, N1, N2) features from each
    side (drawn without replacement within a subset). Returns (mean, std) over the subsets. When both sides have
    exactly that many features every subset is the full set, so the value is computed once (std 0)."""
    f1, f2 = [_real(f, f"the {side} input's features") for f, side in zip((feats1, feats2), SIDES)]
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or f1.shape[1] == 0:
        raise BadStatistics(f"KID needs features [N, d] of the same d > 0 on both sides (got {f1.shape} and "
                            f"{f2.shape}); compute both with the same Inception")
    if subset_size < KID_MIN_SUBSET or subsets < 1:
        raise BadStatistics(f"KID needs subsets of at least {KID_MIN_SUBSET} images and at least 1 subset (got "
                            f"subset size {subset_size}, {subsets} subsets)")
    size = min(subset_size, len(f1), len(f2))
    if size < KID_MIN_SUBSET:
        raise BadStatistics(f"KID needs at least {KID_MIN_SUBSET} images on each side (got {len(f1)} and "
                            f"{len(f2)})")
    if size == len(f1) == len(f2):  # every subset would be the whole of both sets: one value, no spread
        return float(mmd2_unbiased(f1, f2)), 0.0
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), size, replace=False)],
                            f2[rng.choice(len(f2), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))
