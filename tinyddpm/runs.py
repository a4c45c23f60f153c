"""What every training loop needs around its steps: checks, data, resume, RNG state, signals, the NaN/Inf guard,
the cadence of reports, grids and checkpoints. The diffusion loop (training.py) and the DCGAN loop
(gan_training.py) both go through `Run`, so they check, resume, refuse and stop the same way:

    run = Run(cfg, out, "ddpm", device)              # validates the config and --out; creates nothing
    data = run.load_data()                           # the training set and its fingerprint
    ... build the networks and optimizers ...
    with run.begin(models, optimizers) as step, StopSignals() as signals:  # resumed; the folder made and locked
        while step < steps:
            ... one step on the indices run.batches.next(); step += 1 ...
            report, grid, save, stop = run.due(step, signals)   # raises first if a step was NaN/Inf
            ... if save: run.save(step) ... if stop: run.stop(step, signals); break

Safety (docs/reliability.md):
  * the config is validated (config.validate) and --out checked before the data is loaded or anything is created;
  * resuming checks kind, config, labels and a fingerprint of the data; a valid torch file with wrong or missing
    parts (weights, optimizer settings, the autoguidance snapshot, …) is "damaged", one line, for both loops;
  * a killed run's temp files are removed and its log trimmed to the checkpoint when it starts again;
  * out of memory is one line naming the sizes to lower, and a new run that never saved leaves nothing behind;
  * SIGINT / SIGTERM finish the current step, save a checkpoint and stop (a second signal stops at once);
  * a NaN/Inf loss or gradient is recorded on the device without a host sync and checked before every report, grid
    and checkpoint: training stops naming the first bad step and no bad weights are saved (or, with skip_nonfinite,
    such steps are skipped and counted, one host sync per step).
Under torchrun every process runs the same loop on its shard of each global batch; rank 0 alone writes files.
"""
import contextlib
import dataclasses
import math
import os
import sys
from typing import Optional

import torch

from . import data as data_mod
from . import distributed as dist
from .checkpoint import load_checkpoint, nonfinite_tensor, save_checkpoint
from .config import config_differences, validate
from .errors import UserError
from .files import removed_if_unused
from .models import no_labels
from .runfolder import RunFolder
from .stopping import NonFiniteGuard
from .statistics import is_out_of_memory

# What loading a valid torch file with wrong or missing parts raises (another shape, a missing key, a bad type).
DAMAGED = (KeyError, IndexError, RuntimeError, TypeError, ValueError, AttributeError)


# --- progress and cadence ------------------------------------------------------------------------------------
def say(msg):
    """Progress for people: stderr, main process only (under torchrun the others are quiet)."""
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


def due(step, tcfg, stopping):
    """(report, grid, save): every log/sample/save_every steps and at the last step; a checkpoint also on a signal."""
    last = step == tcfg.steps
    return (step % tcfg.log_every == 0 or last, step % tcfg.sample_every == 0 or last,
            step % tcfg.save_every == 0 or last or stopping)


def throughput(steps, batch, seconds, steps_left):
    """(images/s over the last `steps` steps of `batch` images, ETA string for `steps_left` more)."""
    ips = steps * batch / seconds
    return ips, format_eta(steps_left * batch / ips)


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def check_config(cfg, world_size=1):
    """Every value of the config (config.validate), and the global batch split over the processes."""
    validate(cfg)
    if cfg.train.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.train.batch_size} is the global batch and must divide evenly over the "
                        f"{world_size} processes; use a multiple of {world_size}")


# --- data --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingData:
    images: torch.Tensor  # uint8 [N, 3, S, S] on the training device (the whole set lives there)
    labels: Optional[torch.Tensor]  # int64 [N] or multi-hot float [N, K] for a conditional run, else None
    label_info: dict  # {"kind": "none" | "class" | "multilabel", "names": [...]}, stored in checkpoints
    fingerprint: dict  # data.fingerprint: resuming on other data is refused


def load_training_data(cfg, device):
    with dist.main_first():  # under torchrun rank 0 downloads/extracts first; the others then read its files
        images, labels, names = data_mod.load_dataset(cfg.data, split="train")
    if images.shape[0] < 1:
        raise UserError("the training set is empty; check --dataset, --class and --data-dir")
    if cfg.cond.conditional:
        if labels is None:
            raise UserError(f"--conditional needs labels, but dataset {cfg.data.dataset!r} has none; "
                            "use --dataset cifar or shapes, or drop --conditional")
        label_info = {"kind": "class" if labels.dim() == 1 else "multilabel", "names": list(names)}
    else:
        label_info, labels = no_labels(), None
    fingerprint = data_mod.fingerprint(images, labels)  # on the CPU, before the copy to the device
    return TrainingData(images.to(device), None if labels is None else labels.to(device), label_info, fingerprint)


# --- RNG state -----------------------------------------------------------------------------------------------
def rng_state(gen):
    """The training generator and this process's global CPU (and current GPU) generators."""
    state = {"torch": torch.get_rng_state(), "train": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device only: never touch other ranks' GPUs
    return state


def set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["train"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


def gathered_rng_state(gen):
    """rng_state, plus under torchrun every rank's global generators (dropout draws from them), for exact resume."""
    state = rng_state(gen)
    if dist.world_size() > 1:
        ranks = [None] * dist.world_size()
        torch.distributed.all_gather_object(ranks, {k: state[k] for k in ("torch", "cuda") if k in state})
        state["ranks"] = ranks
    return state


def restore_rng_state(state, gen, seed):
    """Undo gathered_rng_state on this rank; resumed with another number of processes, reseed per rank instead."""
    set_rng_state(state, gen)
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == dist.world_size():
        set_rng_state({**ranks[dist.rank()], "train": state["train"]}, gen)
    elif dist.world_size() > 1:
        torch.manual_seed(seed + dist.rank())


# --- the run -----------------------------------------------------------------------------------------------------
def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_optimizer_state(opt):
    """Adam's settings and moment buffers as its constructor and step allow them: torch loads any value or shape
    and fails at the next step. lr, eps and weight_decay finite ≥ 0, two betas in [0, 1), moments of their
    parameter's shape."""
    for group in opt.param_groups:
        for key in ("lr", "eps", "weight_decay"):
            if not (_is_number(group.get(key)) and 0 <= group[key] < math.inf):
                raise ValueError(f"optimizer {key} {group.get(key)!r}")
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1
                                                                              for b in betas)):
            raise ValueError(f"optimizer betas {betas!r}")
        for p in group["params"]:
            for v in opt.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                    raise ValueError(f"optimizer state of shape {list(v.shape)} for a parameter {list(p.shape)}")


def memory_flags(cfg):
    """'--batch-size 64, --base-channels 32, …': the flags that set how much memory training takes, with values."""
    if cfg.model == "dcgan":
        nets = {"--g-channels": cfg.gan.g_channels, "--d-channels": cfg.gan.d_channels}
    else:
        nets = {"--base-channels": cfg.unet.base_channels,
                "--channel-mults": " ".join(map(str, cfg.unet.channel_mults))}
    sizes = {"--batch-size": cfg.train.batch_size, **nets, "--image-size": cfg.data.image_size}
    return ", ".join(f"{flag} {value}" for flag, value in sizes.items())


class Run:
    """One training run of `kind` ("ddpm" or "dcgan"): its folder, data order, training generator, NaN/Inf guard
    and checkpoints. A checkpoint holds the state_dict of every model and optimizer the loop passes to `begin`."""

    def __init__(self, cfg, out, kind, device, log=say, skip_nonfinite=False):
        check_config(cfg, dist.world_size())
        self.folder = RunFolder(out)
        self.folder.check(cfg)
        self.cfg, self.kind, self.device, self.log = cfg, kind, device, log
        self.gen = torch.Generator(device=device).manual_seed(cfg.train.seed)  # flips, timesteps, noise, drops
        self.guard = NonFiniteGuard(device, skip_nonfinite)
        self.last_saved, self.stopped_by, self.models, self.optimizers = None, None, {}, {}
        self._read = None  # (identity, checkpoint) of the folder's checkpoint once read; dropped when training starts

    @property
    def out(self):
        return self.folder.out

    def load_data(self):
        self.data = load_training_data(self.cfg, self.device)
        t = self.cfg.train
        self.batches = data_mod.BatchSampler(self.data.images.shape[0], t.batch_size, t.seed, dist.rank(),
                                             dist.world_size())
        return self.data

    def _check_belongs(self, ckpt):
        """The folder's checkpoint must be of this run: kind, config, labels and data."""
        out = self.folder.out
        if ckpt["kind"] != self.kind:
            raise UserError(f"{self.folder.ckpt} is a {ckpt['kind']} checkpoint, but this is a {self.kind} run; "
                            "use a new --out folder")
        diffs = config_differences(ckpt["run_config"].to_dict(), self.cfg.to_dict())
        if diffs:
            raise UserError(f"{out} holds a run with another config ({'; '.join(diffs[:3])}); "
                            "refusing to mix runs: use a new --out folder or the same flags")
        if ckpt["labels"] != self.data.label_info:
            raise UserError(f"{out} was trained on other labels ({ckpt['labels']['names']}); use a new --out")
        then, now = ckpt.get("data"), self.data.fingerprint
        if then is not None and then != now:  # checkpoints of older tinyddpm versions have no fingerprint
            raise UserError(f"{out} was trained on other data ({data_mod.describe_fingerprint(then)}; now "
                            f"{data_mod.describe_fingerprint(now)}); resume with the same data, or use a new --out")

    def _ckpt_identity(self):
        try:
            st = os.stat(self.folder.ckpt)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _checkpoint(self):
        """The folder's checkpoint (checkpoint.load_checkpoint: its config validated, a damaged or foreign file one
        line), or None for a new run. Read once for each version of the file."""
        identity = self._ckpt_identity()
        if identity is None:
            return None
        if self._read is None or self._read[0] != identity:
            self._read = (identity, load_checkpoint(self.folder.ckpt))
        return self._read[1]

    def previous_config(self):
        """The RunConfig the folder's checkpoint was trained with, or None for a new run; callable before `begin`
        (a loop that fixes values when a run starts reads them back here)."""
        ckpt = self._checkpoint()
        return None if ckpt is None else ckpt["run_config"]

    def previous_snapshot_step(self):
        """The step of the checkpoint's autoguidance snapshot (ema.Snapshot), or None (a new run, none taken);
        `begin` checks the snapshot itself."""
        ckpt = self._checkpoint()
        guide = None if ckpt is None else ckpt["models"].get("guide")
        return guide.get("step") if isinstance(guide, dict) and guide else None

    def _resume(self):
        """Every state restored from the folder's checkpoint, or a one-line refusal; the step (0: a new run)."""
        path, ckpt = self.folder.ckpt, self._checkpoint()
        if ckpt is None:
            return 0
        self._check_belongs(ckpt)
        try:
            for name, m in self.models.items():
                if getattr(m, "optional", False):  # ema.Snapshot: missing from checkpoints from before it existed
                    m.load_state_dict(ckpt["models"].get(name))
                    m.check(self.models[m.of])  # it holds weights of that entry's network
                else:
                    m.load_state_dict(ckpt["models"][name])
                    bad = nonfinite_tensor(m.state_dict())  # the loss guard never saves such weights: an edit
                    if bad:
                        raise ValueError(f"the {name} weights hold NaN or inf ({bad})")
            for name, opt in self.optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][name])
                _check_optimizer_state(opt)
            self.batches.load_state_dict(ckpt["sampler"])
            restore_rng_state(ckpt["rng"], self.gen, self.cfg.train.seed)
            step, skipped = ckpt["step"], ckpt.get("skipped_steps", 0)
            if not all(isinstance(v, int) and v >= 0 for v in (step, skipped)):
                raise ValueError(f"step {step!r}, skipped steps {skipped!r}")
        except DAMAGED as e:
            detail = (str(e).strip().splitlines() or [""])[0][:120]
            raise UserError(f"{path} is damaged ({e.__class__.__name__}: {detail}); move it away to start over, "
                            "or use a new --out folder") from None
        self.guard.skipped, self.last_saved = skipped, step
        return step

    @contextlib.contextmanager
    def memory_guard(self):
        """A failed allocation inside the block (building the networks, a step) becomes one line naming the sizes
        to lower."""
        try:
            yield
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            raise UserError(f"out of memory on {self.device} with {memory_flags(self.cfg)}; lower one of them (a "
                            "checkpoint already saved is kept)") from None

    @contextlib.contextmanager
    def begin(self, models, optimizers):
        """Resume every model and optimizer from the folder's checkpoint, then create the folder and hold its lock
        (runfolder.py) while the block runs: yields the step to start from (0 for a new run).

        Everything that can refuse (another run's or a damaged checkpoint) happens before the lock creates a file;
        a checkpoint that another trainer replaced in between is read again once the lock is held. Out of memory
        in the block is one line (memory_guard), and a run that had saved no checkpoint leaves nothing behind."""
        self.models, self.optimizers = models, optimizers
        seen, step = self._ckpt_identity(), self._resume()
        with removed_if_unused(self.out), self.folder.claimed(self.device), self.memory_guard():
            if self._ckpt_identity() != seen:
                step = self._resume()
            if step:
                self.log(f"resuming {self.out} at step {step}")
            if not dist.all_equal(step, self.device):
                raise UserError(f"the processes found different checkpoints in {self.out} (this one: step {step}); "
                                "put --out on a filesystem that every machine shares")
            self._read = None  # restored: its tensors need not stay in memory
            self.folder.remove_stale_temp()
            self.folder.trim_log(step)  # a killed run may have logged past its last checkpoint
            self.folder.write_config(self.cfg)
            try:
                yield step
            except RuntimeError as e:
                if is_out_of_memory(e) and self.last_saved is None:  # a new run that never saved: nothing to keep
                    self.folder.discard()
                raise

    def due(self, step, signals):
        """(report, grid, save, stop) after `step`; raises first if a step since the last check was NaN/Inf."""
        stop = signals.should_stop(step, self.device) and step < self.cfg.train.steps
        report, grid, save = due(step, self.cfg.train, stop)
        if report or grid or save:
            self.guard.check(self.folder.ckpt, self.last_saved)  # nothing is logged or saved after a NaN/Inf
        return report, grid, save, stop

    def save(self, step):
        state = dict(kind=self.kind, config=self.cfg.to_dict(), labels=self.data.label_info,
                     data=self.data.fingerprint, step=step,
                     models={k: m.state_dict() for k, m in self.models.items()},
                     optimizers={k: o.state_dict() for k, o in self.optimizers.items()},
                     rng=gathered_rng_state(self.gen), sampler=self.batches.state_dict(),
                     skipped_steps=self.guard.skipped)
        if dist.is_main():
            save_checkpoint(self.folder.ckpt, state)
        self.last_saved = step

    def stop(self, step, signals):
        self.stopped_by = signals.received or "a signal to another process"
        self.log(f"stopped by {self.stopped_by} at step {step}; checkpoint {self.folder.ckpt} saved; "
                 "run the same command to resume")
