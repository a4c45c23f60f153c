"""Stopping a training run cleanly: SIGINT/SIGTERM finish the step and save (StopSignals), and a NaN/Inf loss or
gradient stops the run before anything is logged or saved after it (NonFiniteGuard). Both loops use them through
runs.Run; under torchrun the processes decide together."""
import signal
import threading

import torch

from . import distributed as dist
from .errors import UserError

# Under torchrun the processes agree on whether a signal arrived every this many steps (a collective and a host
# sync); a single process looks at its flag after every step, which costs nothing.
STOP_POLL_EVERY = 10
NO_BAD_STEP = torch.iinfo(torch.int64).max  # "no non-finite step seen yet"


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM (kill, a cluster's time limit) only set `.received`; the loop
    then saves a checkpoint and returns. A second signal stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received, self._old = None, {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    def should_stop(self, step, device):
        """Whether to stop after `step`; under torchrun all processes decide together every STOP_POLL_EVERY steps."""
        if dist.world_size() == 1:
            return self.received is not None
        if step % STOP_POLL_EVERY:
            return False
        flag = torch.tensor([int(self.received is not None)], device=device)
        return bool(dist.all_reduce_(flag, "max").item())


class NonFiniteGuard:
    """Remembers the first step whose loss or gradient norm was NaN/Inf, on the device (no host sync per step).

    `check()` (a host sync; collective under torchrun) raises before anything is logged or saved after a bad step.
    With `skip=True`, `step_ok()` decides each step on the host instead, and the caller skips the update.
    """

    def __init__(self, device, skip=False, skipped=0):
        self.skip, self.skipped = skip, skipped
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)

    def record(self, step, *values):
        """values: 0-d tensors of this step (the loss, the gradient norm, …); `step` counts from 1."""
        finite = torch.stack([torch.isfinite(v) for v in values]).all()
        self.first_bad = torch.where(finite, self.first_bad, torch.clamp(self.first_bad, max=step))

    def step_ok(self, *values):
        ok = torch.stack([torch.isfinite(v) for v in values]).all().to(torch.int64).reshape(1)
        if not dist.all_reduce_(ok, "min").item():  # every process skips the same steps
            self.skipped += 1
            return False
        return True

    def check(self, ckpt_path, last_saved):
        bad = dist.all_reduce_(self.first_bad.clone(), "min").item()
        if bad != NO_BAD_STEP:
            kept = (f"the last good checkpoint {ckpt_path} (step {last_saved}) is kept" if last_saved is not None
                    else "no checkpoint had been written yet")
            raise UserError(f"the loss or its gradient became NaN/Inf at step {bad}; training stopped and {kept}; "
                            "lower --lr, check the data, or pass --skip-nonfinite to skip such steps")
