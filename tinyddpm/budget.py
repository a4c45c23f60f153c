"""The time budget: `train.py --minutes M` fits a run to M minutes of this machine.

Before the first step, the loop times PROBE_STEPS training steps on a throwaway copy of its networks and optimizers
(after PROBE_SKIP untimed ones, which build kernels and grow the allocator's pool), and one sample grid. The copy's
results are discarded and the global random state is restored, so the run itself starts exactly as a run with a
fixed --steps would. From the seconds per step, the grids' share of them, and the time already spent (data,
networks, the probe), it fixes the total step count: everything that depends on it (the learning-rate decay, the
autoguidance snapshot, the DCGAN's instance-noise anneal) follows, and the count is stored in the run (the
checkpoint's config), so a resume finishes the same count and gives the same weights as an uninterrupted run of
`--steps <count>`.

The count is fixed once. If a neighbour process slows the machine after that, the run keeps its count and takes
longer than M minutes; if the machine gets faster, it ends early. Resuming never re-times.
"""
import time
from contextlib import contextmanager

import torch

from . import distributed as dist
from .errors import UserError

PROBE_SKIP = 5  # untimed steps first: the first calls build oneDNN / cuDNN kernels and grow the allocator's pool
PROBE_STEPS = 20  # timed steps


class Clock:
    """Seconds since the run began (train.py's data loading and network building count against the budget)."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start


def seconds_per_call(fn, calls=PROBE_STEPS, skip=PROBE_SKIP, sync=None):
    """Wall seconds per call of fn(), over `calls` calls after `skip` untimed ones. sync(): wait for the device."""
    for _ in range(skip):
        fn()
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / calls


def steps_for(minutes, elapsed, step_seconds, grid_seconds=0.0, sample_every=1):
    """The step count that fills what is left of `minutes` after `elapsed` seconds: each step costs step_seconds
    and every sample_every-th step also a grid of grid_seconds. At least 1."""
    per_step = step_seconds + grid_seconds / sample_every
    return max(1, int((minutes * 60.0 - elapsed) / per_step))


@contextmanager
def untouched_random_state(device):
    """Restore the global CPU (and this CUDA device's) random state afterwards: the probe's dropout and data draws
    must not shift the run's."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def sync_for(device):
    """A function that waits for `device`'s queued work (CUDA runs asynchronously), or None on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def fix_length(run, clock, probe):
    """The run's total step count: --steps, the count a budgeted run fixed when it started (read back from its
    checkpoint), or a new budget's. probe() → (seconds a step, seconds a grid), timed on copies of the networks;
    under torchrun the slowest process decides. Refuses a resume that would change what the run already fixed."""
    tcfg, before = run.cfg.train, run.previous_config()
    if before is not None:
        check_resume(before.train, tcfg, run.previous_snapshot_step())
        if tcfg.minutes > 0:
            return before.train.steps
    if tcfg.minutes <= 0:
        return tcfg.steps
    with untouched_random_state(run.device):
        step_s, grid_s = probe()
    step_s = dist.all_reduce_(torch.tensor([step_s], device=run.device), "max").item()
    grid_s = grid_s if dist.is_main() else 0.0  # only the main process makes grids
    steps = steps_for(tcfg.minutes, clock.elapsed(), step_s, grid_s, tcfg.sample_every)
    steps = int(dist.all_reduce_(torch.tensor([steps], device=run.device), "min").item())
    run.log(f"time budget: {tcfg.minutes:g} min → {steps} steps ({step_s:.3f} s a step over {PROBE_STEPS} timed "
            f"steps, a grid every {tcfg.sample_every} steps {grid_s:.1f} s, {clock.elapsed():.0f} s spent before the "
            "first step); stored in the run: a resume finishes them")
    return steps


def check_resume(before, now, snapshot_step):
    """A resumed run keeps what it fixed: its budget's count (same --minutes, or --steps to train to another
    count) and its autoguidance snapshot (same --guide-at once taken)."""
    if now.minutes > 0 and now.minutes != before.minutes:
        what = f"--minutes {before.minutes:g}" if before.minutes else f"--steps {before.steps}"
        raise UserError(f"this run was started with {what} ({before.steps} steps); resume with the same flag, or "
                        f"with --steps N to train to N steps")
    if snapshot_step is not None and now.guide_at != before.guide_at:
        raise UserError(f"this run kept its autoguidance snapshot at step {snapshot_step} (--guide-at "
                        f"{before.guide_at:g}); resume with --guide-at {before.guide_at:g} (sample.py --autoguidance "
                        "1 samples without it)")
