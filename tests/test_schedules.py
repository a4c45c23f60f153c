import math

import numpy as np
import pytest

from tinyddpm.schedules import COSINE_OFFSET, MAX_BETA, get_betas


def test_linear_closed_form():
    b = get_betas("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    ab = np.cumprod(1 - b)
    # ᾱ at t = 0 is 1 − β_1; at T−1 it is ∏(1 − β_t), which for this schedule is ≈ 4.036e-5 (Ho et al.).
    assert ab[0] == pytest.approx(1 - 1e-4, rel=1e-12)
    assert ab[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-12)
    assert ab[-1] == pytest.approx(4.0358e-5, rel=1e-3)


def test_linear_scaled_for_other_T():
    b = get_betas("linear", 250)
    assert b[0] == pytest.approx(4e-4) and b[-1] == pytest.approx(0.08)


def test_cosine_closed_form():
    T = 1000
    b = get_betas("cosine", T)
    ab = np.cumprod(1 - b)
    f = lambda t: math.cos((t / T + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    for t in (0, 10, 500):
        assert ab[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert b.max() <= MAX_BETA and b[-1] == MAX_BETA


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [1, 10, 1000, 4000])
def test_any_T_monotone(name, T):
    b = get_betas(name, T)
    assert b.shape == (T,) and np.all(b > 0) and np.all(b <= MAX_BETA)
    ab = np.cumprod(1 - b)
    assert np.all(np.diff(ab) <= 0)


def test_bad_T():
    with pytest.raises(ValueError):
        get_betas("linear", 0)
