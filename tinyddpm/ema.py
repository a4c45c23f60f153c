"""Exponential moving average of the weights, kept as a full copy of the model (used for sampling by default).

The EMA copy is an ordinary nn.Module in eval mode, always fp32, so the same diffusion and samplers use it as they
would the training model. Buffers (e.g. BatchNorm statistics) are copied, not averaged.
"""
import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self, step: int) -> float:
        """With warm-up, min(decay, (1 + s)/(10 + s)): early weights are forgotten quickly (as in TF's EMA)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        d = self.current_decay(step)
        ema_p = list(self.model.parameters())
        src_p = [p.detach().float() for p in model.parameters()]
        # ema ← ema + (1 − d)·(p − ema), one fused foreach kernel over all tensors.
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


def check_snapshot(state, like):
    """A stored snapshot, {} or {"step": int, "weights": state_dict}, checked against `like` (the network whose
    weights it holds, or its EMA): the same names and shapes, finite values, a step ≥ 1. Returns the step, or None
    for {} (none taken yet) and None (a checkpoint from before snapshots). ValueError says what is wrong."""
    if state is None or (isinstance(state, dict) and not state):
        return None
    if not isinstance(state, dict) or set(state) != {"step", "weights"}:
        what = f"has keys {sorted(state)}" if isinstance(state, dict) else f"is a {type(state).__name__}"
        raise ValueError(f"the autoguidance snapshot {what}, not step and weights")
    step, weights = state["step"], state["weights"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"the autoguidance snapshot's step is {step!r}, not a positive integer")
    want = {k: tuple(v.shape) for k, v in like.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items() if torch.is_tensor(v)} if isinstance(weights, dict) else {}
    if got != want:
        bad = sorted(set(want) ^ set(got)) or sorted(k for k in want if got[k] != want[k])
        raise ValueError(f"the autoguidance snapshot's weights do not fit the network ({len(got)} of {len(want)} "
                         f"tensors match by name; first difference: {bad[0] if bad else 'not a dict of tensors'})")
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"the autoguidance snapshot's {k} holds NaN or inf")
    return step


class Snapshot:
    """The EMA weights as they were after one training step, kept for autoguidance (samplers.autoguided): the
    "bad version" of the final model, which sampling pushes away from. Empty until `take`.

    Stored in the checkpoint under models["guide"] as {"step": int, "weights": state_dict}, or {} before it is
    taken. A checkpoint from before snapshots existed has no entry; `optional` tells the run to accept that. A
    loaded one is checked (`check`, or check_snapshot on the stored dict) against `of`, the entry it copies."""
    optional = True
    of = "ema"

    def __init__(self):
        self.state = {}

    def take(self, ema: EMA, step: int):
        self.state = dict(step=step, weights={k: v.detach().clone() for k, v in ema.state_dict().items()})

    @property
    def taken(self):
        return bool(self.state)

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = {} if state is None else state  # anything else is for `check` to judge

    def check(self, like):
        """ValueError unless the snapshot is empty or fits `like` (check_snapshot)."""
        check_snapshot(self.state, like)
