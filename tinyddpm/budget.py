"""The time budget: `train.py --minutes M` fits a run to M minutes of this machine.

Before the first step, the loop times PROBE_STEPS training steps on a throwaway copy of its networks and optimizers
(after PROBE_SKIP untimed ones, which build kernels and grow the allocator's pool), and one sample grid. The copy's
results are discarded and the global random state is restored, so the run itself starts exactly as a run with a
fixed --steps would. From the seconds per step, the grids' share of them, and the time already spent (data,
networks, the probe), it fixes the total step count: everything that depends on it (the learning-rate decay, the
autoguidance snapshot, the DCGAN's instance-noise anneal) follows, and the count is stored in the run (the
checkpoint's config), so a resume finishes the same count and gives the same weights as an uninterrupted run of
`--steps <count>`.

Twenty steps are a few seconds, and a shared machine can be slow for a few seconds: probes of the same command a
few minutes apart can disagree by a third (docs/recipe.md, fifteenth round). So a diffusion run fixes its count a
second time from its own steps (Refit): it times its learning-rate warm-up (after RETIME_SKIP untimed steps) and
fits the count again at the warm-up's last step from that timing alone: 95 steps of the tiny preset where the run
trains, against the probe's 20 on copies before it. Nothing depends on the count before that step (the warm-up's
rates do not; the decay and the autoguidance snapshot come after it), so the run is still exactly a run of
`--steps <count>`. The DCGAN keeps the probe's count: its instance-noise anneal depends on the count from the first
step.

After that the count stays fixed. If a neighbour process slows the machine later, the run keeps its count and takes
longer than M minutes; if the machine gets faster, it ends early. Resuming never re-times, and a run stopped before
its warm-up ended finishes the probe's count.
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from . import distributed as dist
from .errors import UserError

PROBE_SKIP = 5  # untimed steps first: the first calls build oneDNN / cuDNN kernels and grow the allocator's pool
PROBE_STEPS = 20  # timed steps
RETIME_SKIP = 5  # the run's own first steps, untimed by Refit: its networks' first calls grow the allocator's pool


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


@dataclass
class Length:
    """The run's step count, and the probe's seconds a step and a grid when a new budget fixed it (else None)."""
    steps: int
    step_s: Optional[float] = None
    grid_s: float = 0.0


def fix_length(run, clock, probe):
    """The run's Length: --steps, the count a budgeted run fixed when it started (read back from its checkpoint),
    or a new budget's. probe() → (seconds a step, seconds a grid), timed on copies of the networks; under torchrun
    the slowest process decides. Refuses a resume that would change what the run already fixed."""
    tcfg, before = run.cfg.train, run.previous_config()
    if before is not None:
        check_resume(before.train, tcfg, run.previous_snapshot_step())
        if tcfg.minutes > 0:
            return Length(before.train.steps)
    if tcfg.minutes <= 0:
        return Length(tcfg.steps)
    with untouched_random_state(run.device):
        step_s, grid_s = probe()
    step_s = dist.all_reduce_(torch.tensor([step_s], device=run.device), "max").item()
    grid_s = grid_s if dist.is_main() else 0.0  # only the main process makes grids
    steps = _fit(tcfg, clock, step_s, grid_s, run.device)
    run.log(f"time budget: {tcfg.minutes:g} min → {steps} steps ({step_s:.3f} s a step over {PROBE_STEPS} timed "
            f"steps, a grid every {tcfg.sample_every} steps {grid_s:.1f} s, {clock.elapsed():.0f} s spent before the "
            "first step); stored in the run: a resume finishes them")
    return Length(steps, step_s, grid_s)


def _fit(tcfg, clock, step_s, grid_s, device, done=0):
    """steps_for over what is left of the budget after `done` steps; under torchrun the smallest count wins."""
    steps = done + steps_for(tcfg.minutes, clock.elapsed(), step_s, grid_s, tcfg.sample_every)
    return int(dist.all_reduce_(torch.tensor([steps], device=device), "min").item())


class Refit:
    """Fits a new budget's count again at `end` (the warm-up's last step) from the run's own seconds a step over
    steps RETIME_SKIP … `end`, which replace the probe's.

    at(step) is called after each step and returns the new count at `end`, else None; allowed(count) says whether
    nothing that depends on the count has happened by then (training.py: the autoguidance snapshot)."""

    def __init__(self, run, clock, length, end, allowed):
        self.run, self.clock, self.length, self.end, self.allowed = run, clock, length, end, allowed
        self.sync, self.t0 = sync_for(run.device), None

    @staticmethod
    def possible(length, end):
        """A new budget, and a warm-up long enough to time at least as many steps as the probe did."""
        return length.step_s is not None and end - RETIME_SKIP >= PROBE_STEPS

    def at(self, step):
        if step not in (RETIME_SKIP, self.end):
            return None
        if self.sync:
            self.sync()
        if step == RETIME_SKIP:
            self.t0 = time.perf_counter()
            return None
        own = (time.perf_counter() - self.t0) / (self.end - RETIME_SKIP)
        own = dist.all_reduce_(torch.tensor([own], device=self.run.device), "max").item()
        tcfg = self.run.cfg.train
        steps = _fit(tcfg, self.clock, own, self.length.grid_s, self.run.device, done=step)
        said = (f"time budget: the {step - RETIME_SKIP} steps to step {step} took {own:.3f} s a step (the probe: "
                f"{self.length.step_s:.3f})")
        if not self.allowed(steps):
            self.run.log(f"{said}; {steps} steps would move the autoguidance snapshot before this step: "
                         f"keeping {tcfg.steps}")
            return None
        self.run.log(f"{said} → {steps} steps")
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
