"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §3 and
appendix C.1-C.3): choose the averaging length of the weights after training instead of guessing one EMA decay
before it.

A power-function EMA at step t averages the weights θ_τ of the steps τ ≤ t with weights ∝ τ^γ. Its length is
the profile's relative standard deviation σ_rel (its std over τ divided by t), which, unlike a decay, means the same
at any run length. train.py --posthoc-ema 0.05 0.1 tracks one such average per σ_rel (PowerEMA) and stores them all
every --posthoc-every steps and at each checkpoint (runfolder: posthoc/step_0004000.pt). sample.py --posthoc-ema
0.08 then rebuilds the average of any σ_rel at the checkpoint's step as a linear combination of the stored ones: the
combination whose profile is nearest the wanted profile in L² (`coefficients`).

Only PowerEMA and the stored files touch torch; the profile arithmetic is float64 numpy, tested in closed form.
"""
import copy
import glob
import math
import os
import re

import numpy as np
import torch

from .errors import UserError
from .files import atomic_torch_save

# σ_rel of γ = 0, the flat average of every step so far. Longer profiles need γ < 0, which weight the first steps
# most: σ_rel is no longer one-to-one in γ there (it peaks near γ = −0.4), so it stays below this bound.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
FOLDER, NAME, PATTERN = "posthoc", "step_{:07d}.pt", re.compile(r"step_(\d{7})\.pt$")
FORMAT = "tinyddpm-posthoc-ema"
# A rebuilt profile this far from the wanted one (relative L² error) is flagged in sample.py's line. With EDM2's
# 0.05 and 0.1 stored 16 times in a run, the last at its last step, lengths from 0.03 to 0.2 fit within it
# (tests/test_posthoc_ema.py); without the last step, the last 1/16 of the run would be missing from every profile.
POOR_FIT = 0.05


# --- the profiles (float64) ---------------------------------------------------------------------------------------
def sigma_rel_of(gamma):
    """σ_rel of the profile p(τ) ∝ τ^γ on [0, t] (the paper's eq. 123): std(τ) / t = √((γ+1) / ((γ+2)² (γ+3)))."""
    g = np.float64(gamma)
    return float(np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0))))


def gamma_of(sigma_rel):
    """The exponent γ > 0 whose profile has this σ_rel, 0 < σ_rel < MAX_SIGMA_REL: the root of
    (γ+2)²(γ+3) = σ_rel⁻² (γ+1), a cubic with one positive root (its other two have real parts below −3.5)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"σ_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (got {sigma_rel})")
    s = np.float64(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def beta(gamma, step):
    """The EMA decay at update `step` (1, 2, …) that keeps the average's weights of steps τ ∝ τ^γ (eq. 127):
    (1 − 1/step)^(γ+1). It grows with the step, so the average's length stays a fixed fraction of the run; step 1
    copies the weights (β = 0)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def overlap(t_a, gamma_a, t_b, gamma_b):
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of two profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (each integrates to 1),
    broadcast over arrays: (γa+1)(γb+1) / ((γa+γb+1) t_hi) · (t_lo / t_hi)^γ_hi, where t_hi is the longer of the
    two and γ_hi its exponent."""
    t_a, g_a, t_b, g_b = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    t_lo, t_hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_hi = np.where(t_a <= t_b, g_b, g_a)
    return (g_a + 1.0) * (g_b + 1.0) / ((g_a + g_b + 1.0) * t_hi) * (t_lo / t_hi) ** g_hi


def coefficients(stored, target):
    """The weights x [n] (float64, summing to 1) of the stored averages, `stored` = [(step, γ)] × n, whose combined
    profile Σ x_i p_i is nearest the `target` = (step, γ) profile in L²: the normal equations A x = b with
    A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p_target⟩ (least squares, so repeated profiles do not make A singular),
    scaled to sum to 1 so the result is an average of weights. Also returns the fit's relative L² error,
    ‖Σ x_i p_i − p_target‖ / ‖p_target‖."""
    t, g = np.asarray(stored, dtype=np.float64).reshape(-1, 2).T
    a = overlap(t[:, None], g[:, None], t[None, :], g[None, :])
    b = overlap(t, g, *target)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    x = x / x.sum()
    target_norm2 = overlap(*target, *target)
    error2 = x @ a @ x - 2.0 * x @ b + target_norm2
    return x, float(np.sqrt(max(error2, 0.0) / target_norm2))


# --- tracking during training ----------------------------------------------------------------------------------
class PowerEMA:
    """One power-function EMA of `model`'s weights per σ_rel, held as a ModuleList of fp32 copies, so its state_dict
    is flat ("0.<name>", "1.<name>", …) and a checkpoint loads it strictly. Buffers are copied, not averaged."""

    def __init__(self, model, sigma_rels):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.averages = torch.nn.ModuleList(copy.deepcopy(model).float().eval().requires_grad_(False)
                                            for _ in self.sigma_rels)

    @torch.no_grad()
    def update(self, model, step):
        """Fold in `model`'s weights after update `step` (1-based)."""
        src = [p.detach().float() for p in model.parameters()]
        for gamma, avg in zip(self.gammas, self.averages):
            torch._foreach_lerp_(list(avg.parameters()), src, 1.0 - beta(gamma, step))
            for eb, b in zip(avg.buffers(), model.buffers()):
                eb.copy_(b)

    def state_dict(self):
        return self.averages.state_dict()

    def load_state_dict(self, state):
        self.averages.load_state_dict(state)

    def store(self, run_dir, step):
        """Write the averages of `step` to run_dir/posthoc/ atomically: a plain dict that weights_only loads."""
        os.makedirs(os.path.join(run_dir, FOLDER), exist_ok=True)
        weights = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        atomic_torch_save(dict(format=FORMAT, step=step, sigma_rels=list(self.sigma_rels), weights=weights),
                          os.path.join(run_dir, FOLDER, NAME.format(step)))


def stored_steps(run_dir):
    """{step: path} of the averages stored in run_dir/posthoc/."""
    paths = glob.glob(os.path.join(glob.escape(run_dir), FOLDER, "step_*.pt"))
    return {int(m.group(1)): p for p in paths if (m := PATTERN.search(os.path.basename(p)))}


def drop_after(run_dir, step):
    """Remove the averages stored after `step`: a resumed run restarts there, and a killed run may have stored past
    its last checkpoint (with the same count they would come back identical; with a larger --steps they would not)."""
    for s, path in stored_steps(run_dir).items():
        if s > step:
            os.remove(path)


# --- rebuilding an average after training ------------------------------------------------------------------------
def _read(path, sigma_rels, want):
    """The flat weights of one stored file, checked: format, σ_rels of the run, the names and shapes of `want`
    ({"j.<name>": shape}), finite values. UserError naming the file otherwise."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise ValueError("not a post-hoc EMA file")
        if [float(s) for s in stored["sigma_rels"]] != list(sigma_rels):
            raise ValueError(f"its σ_rels {stored['sigma_rels']} are not the run's {list(sigma_rels)}")
        weights = stored["weights"]
        if set(weights) != set(want) or any(weights[k].shape != shape for k, shape in want.items()):
            raise ValueError("its weights do not fit the run's network")
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            raise ValueError("its weights hold NaN or inf")
    except Exception as e:  # unzipping/unpickling a damaged file can fail anywhere
        detail = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:120]
        raise UserError(f"{path} is damaged ({detail}); delete it (the other stored averages still rebuild one) "
                        "or sample without --posthoc-ema") from None
    return weights


def rebuild(run_dir, sigma_rel, step, run_sigma_rels, net):
    """The weights (a state_dict of `net`, the run's network) of the σ_rel average at `step`, from the averages
    stored at steps ≤ `step` in run_dir/posthoc/, and a line describing the fit. UserError when the run stored
    none or σ_rel is out of range."""
    if not run_sigma_rels:
        raise UserError("this run tracked no post-hoc EMA (train with --posthoc-ema 0.05 0.1); drop --posthoc-ema")
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(f"--posthoc-ema must be a σ_rel between 0 and {MAX_SIGMA_REL:.4f}, exclusive (got "
                        f"{sigma_rel}); train.py --posthoc-ema stores the σ_rels it tracks")
    files = sorted((s, p) for s, p in stored_steps(run_dir).items() if s <= step)
    if not files:
        raise UserError(f"{os.path.join(run_dir, FOLDER)} holds no stored averages up to step {step}; sample "
                        "without --posthoc-ema, or train on to store some")
    gammas = [gamma_of(s) for s in run_sigma_rels]
    x, error = coefficients([(s, g) for s, _ in files for g in gammas], (step, gamma_of(sigma_rel)))
    params = dict(net.named_parameters())
    want = {f"{j}.{k}": v.shape for j in range(len(gammas)) for k, v in net.state_dict().items()}  # PowerEMA's names
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    for i, (_, path) in enumerate(files):
        weights = _read(path, run_sigma_rels, want)
        for j in range(len(gammas)):
            for k in total:
                total[k] += float(x[i * len(gammas) + j]) * weights[f"{j}.{k}"].double()
    # Buffers come from the newest file: training copies them rather than averaging.
    state = {k: total[k].to(v.dtype) if k in params else weights[f"0.{k}"] for k, v in net.state_dict().items()}
    what = (f"post-hoc EMA σ_rel {sigma_rel:g} at step {step}: {len(x)} stored averages of {len(files)} steps "
            f"combined, profile fit error {100 * error:.1f} %")
    if error > POOR_FIT:
        what += ("; a rough fit: σ_rel far outside the tracked ones, or too few stored steps (train with a smaller "
                 "--posthoc-every)")
    return state, what
