"""Noise schedules: β_1..β_T as float64 numpy arrays, pure functions of T.

Index t = 0 … T−1 in code is step t+1 of the papers: ᾱ[t] = ∏_{s ≤ t} (1 − β[s]).
"""
import math

import numpy as np

# Ho et al. (2020): β rises linearly from 1e-4 to 0.02 over T = 1000 steps. For other T the end points are scaled
# by 1000/T (Nichol & Dhariwal 2021) so the total amount of noise stays about the same.
LINEAR_BETA_START, LINEAR_BETA_END, LINEAR_REFERENCE_T = 1e-4, 0.02, 1000
COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal: keeps β small near t = 0
MAX_BETA = 0.999       # clip so that the last steps do not become singular (ᾱ_T would reach 0)
SIGMOID_START, SIGMOID_END, SIGMOID_TAU = -3.0, 3.0, 1.0  # Jabri et al. (2022), as in denoising-diffusion-pytorch


def linear_betas(timesteps: int) -> np.ndarray:
    scale = LINEAR_REFERENCE_T / timesteps
    betas = np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, timesteps, dtype=np.float64)
    return np.clip(betas, 0.0, MAX_BETA)  # only bites for T < 20, where the scaled end would pass 1


def betas_from_alpha_bar(alpha_bar_fn, timesteps: int) -> np.ndarray:
    """β_t = 1 − ᾱ(t+1)/ᾱ(t) for a continuous ᾱ on [0, 1], clipped at MAX_BETA."""
    s = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    ab = alpha_bar_fn(s)
    return np.clip(1.0 - ab[1:] / ab[:-1], 0.0, MAX_BETA)


def cosine_betas(timesteps: int) -> np.ndarray:
    return betas_from_alpha_bar(
        lambda s: np.cos((s + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2, timesteps)


def sigmoid_betas(timesteps: int) -> np.ndarray:
    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = sig(SIGMOID_START / SIGMOID_TAU), sig(SIGMOID_END / SIGMOID_TAU)
    return betas_from_alpha_bar(
        lambda s: (v_end - sig((s * (SIGMOID_END - SIGMOID_START) + SIGMOID_START) / SIGMOID_TAU)) / (v_end - v_start),
        timesteps)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}


def get_betas(name: str, timesteps: int) -> np.ndarray:
    if timesteps < 1:
        raise ValueError(f"timesteps must be ≥ 1, got {timesteps}")
    return SCHEDULES[name](timesteps)
