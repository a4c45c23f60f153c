"""Fréchet distance between two Gaussians, and the kernel inception distance (KID), in float64.

FD = |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2). The last trace is computed without a matrix square root of the
non-symmetric Σ1 Σ2 (scipy.linalg.sqrtm, whose disp= argument pytorch-fid uses is gone in SciPy 1.18): Σ1 Σ2 is
similar to the symmetric PSD matrix M = Rᵀ Σ2 R for any R with R Rᵀ = Σ1, so tr √(Σ1 Σ2) = Σ √λ_i(M). R is the
Cholesky factor when Σ1 is well conditioned (cheap), else the symmetric square root from eigh (works for a singular
Σ1). Every step is symmetric, so fewer images than 2048 features give no NaN and no imaginary part.
"""
import warnings

import numpy as np

SINGULAR_RTOL = 1e-10  # eigenvalues below this × the largest count as zero (a singular covariance)
KID_SUBSETS = 100  # KID defaults of Bińkowski et al. / torch-fidelity
KID_SUBSET_SIZE = 1000


def _sym_sqrt(a):
    """Symmetric PSD square root by eigendecomposition; tiny negative eigenvalues (round-off) are clipped to 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _factor(a):
    """R with R Rᵀ = a: Cholesky (n³/3 flops) if a is clearly positive definite, else the eigh square root."""
    try:
        chol = np.linalg.cholesky(a)
        pivots = np.diag(chol) ** 2  # a near-singular a gives tiny pivots and an inaccurate factor
        if pivots.min() > SINGULAR_RTOL * pivots.max():
            return chol
    except np.linalg.LinAlgError:
        pass
    return _sym_sqrt(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, n1=None, n2=None):
    """FD between N(mu1, sigma1) and N(mu2, sigma2). n1/n2 (images behind each side, if known) only feed the
    small-sample warning. Warns (UserWarning) when a covariance is singular: FID is then biased, prefer KID."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # symmetric by construction; remove round-off asymmetry
    r = _factor(s1)
    eig = np.linalg.eigvalsh(r.T @ s2 @ r)  # λ(Rᵀ Σ2 R) = λ(Σ1 Σ2), all ≥ 0 up to round-off
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    dim = mu1.shape[0]
    small = [n for n in (n1, n2) if n is not None and n <= dim]
    if small or eig.min() <= SINGULAR_RTOL * max(eig.max(), 1e-300):
        why = f"{min(small)} images ≤ {dim} features" if small else "a covariance is singular"
        warnings.warn(f"{why}: FID is biased (too high) at small N and not comparable across N; KID (--kid) is "
                      f"the better number there", stacklevel=2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


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
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    if size == len(f1) == len(f2):  # every subset would be the whole of both sets: one value, no spread
        return float(mmd2_unbiased(f1, f2)), 0.0
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), size, replace=False)],
                            f2[rng.choice(len(f2), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))
