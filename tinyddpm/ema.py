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


class Snapshot:
    """The EMA weights as they were after one training step, kept for autoguidance (samplers.autoguided): the
    "bad version" of the final model, which sampling pushes away from. Empty until `take`.

    Stored in the checkpoint under models["guide"] as {"step": int, "weights": state_dict}, or {} before it is
    taken. A checkpoint from before snapshots existed has no entry; `optional` tells the run to accept that."""
    optional = True

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
        self.state = dict(state or {})
