"""The diffusion training loop: in-memory data, per-image timesteps, AdamW with warm-up, EMA, exact resume.

A run folder holds everything of one run:
    runs/<name>/ckpt.pt       latest checkpoint (atomic; resuming reads it)
    runs/<name>/config.json   the run's config, for people to read
    runs/<name>/log.jsonl     one JSON line per progress report
    runs/<name>/samples/      EMA sample grids, step_0001000.png …
Running the same command again resumes from ckpt.pt: step, weights, EMA, optimizer, RNG states and data order.

Crash safety (docs/reliability.md):
  * every file is written atomically (temp file + os.replace), so SIGKILL at any moment leaves the previous
    checkpoint or grid intact; a killed run's temp files are removed when the run starts again;
  * SIGINT / SIGTERM finish the current step, save a checkpoint and stop (a second signal stops at once);
  * a NaN/Inf loss or gradient is recorded on the device without a host sync, and checked at every progress line,
    sample grid and checkpoint: training stops naming the first bad step, and no bad weights are ever saved.
    With skip_nonfinite such steps are skipped instead (one host sync per step) and counted.
Under torchrun (tinyddpm/distributed.py) every process runs this same loop on its shard of each global batch;
DistributedDataParallel averages the gradients and only rank 0 writes files.
"""
import glob
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np
import torch

from . import data as data_mod
from . import distributed as dist
from .checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint
from .config import config_differences, validate
from .devices import autocast
from .ema import EMA
from .errors import UserError
from .files import atomic_write_bytes, check_output_dir
from .imageio import make_grid, save_png, to_uint8
from .models import build_diffusion, build_unet, no_labels
from .samplers import ddim_sample, guided

# Under torchrun the processes agree on whether a signal arrived every this many steps (a collective and a host
# sync); a single process looks at its flag after every step, which costs nothing.
STOP_POLL_EVERY = 10
NO_BAD_STEP = torch.iinfo(torch.int64).max  # "no non-finite step seen yet"


# --- the run folder: paths, log, progress ------------------------------------------------------------------------
class RunFolder:
    """Paths of one run. Its writing methods do nothing outside the main process (rank 0 writes for everyone)."""

    def __init__(self, out):
        self.out = check_output_dir(out)
        self.ckpt = os.path.join(out, CKPT_NAME)
        self.log = os.path.join(out, "log.jsonl")
        self.config = os.path.join(out, "config.json")
        self.samples = os.path.join(out, "samples")

    def check_writable(self):
        """Fail before the slow part starts if the run folder (or the folder that would hold it) is read-only."""
        path = os.path.abspath(self.out)
        while not os.path.exists(path):  # the nearest folder that exists is where it would be created
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise UserError(f"cannot create run folder {self.out}: {path} is a file; choose another --out")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {path}: permission denied; choose a writable --out folder")

    def remove_stale_temp(self):
        """Delete the temp files of writes that a killed run never finished (.ckpt.pt.*.tmp and the like)."""
        if not dist.is_main():
            return
        for folder in (self.out, self.samples):
            for tmp in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def write_config(self, cfg):
        if dist.is_main():
            atomic_write_bytes(self.config, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())

    def trim_log(self, step):
        """Keep only log lines up to `step` (the resumed checkpoint), dropping any half-written last line."""
        if not dist.is_main() or not os.path.exists(self.log):
            return
        kept = []
        with open(self.log, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= step:
                    kept.append(json.dumps(rec) + "\n")
        atomic_write_bytes(self.log, "".join(kept).encode())

    def append_log(self, record):
        if not dist.is_main():
            return
        try:
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: the next resume trims a half-written line, the checkpoint is untouched
            raise UserError(f"cannot write {self.log}: {e.strerror}; free some space, then run the same command "
                            "to resume from the last checkpoint") from None

    def grid_path(self, step):
        return os.path.join(self.samples, f"step_{step:07d}.png")


def due(step, tcfg, stopping):
    """(report, grid, save): what is due after `step` — every log/sample/save_every steps and at the last step;
    a checkpoint also when a signal stops the run. Shared by the diffusion and GAN loops."""
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


def say(msg):
    """Progress for people: stderr, main process only (under torchrun the others are quiet)."""
    if dist.is_main():
        print(msg, file=sys.stderr, flush=True)


# --- flags ---------------------------------------------------------------------------------------------------
def check_train_flags(cfg, world_size=1):
    """Every value of the config (config.validate), and the global batch split over the processes."""
    validate(cfg)
    if cfg.train.batch_size % world_size:
        raise UserError(f"--batch-size {cfg.train.batch_size} is the global batch and must divide evenly over the "
                        f"{world_size} processes; use a multiple of {world_size}")


# --- data and conditioning -----------------------------------------------------------------------------------
def load_training_data(cfg, device):
    """uint8 images [N, 3, S, S] on `device` (the whole set lives there) and the labels description."""
    with dist.main_first():  # under torchrun rank 0 downloads/extracts first; the others then read its files
        images, labels, names = data_mod.load_dataset(cfg.data, split="train")
    if cfg.cond.conditional:
        if labels is None:
            raise UserError(f"--conditional needs labels, but dataset {cfg.data.dataset!r} has none; "
                            "use --dataset cifar or shapes, or drop --conditional")
        kind = "class" if labels.dim() == 1 else "multilabel"
        label_info = {"kind": kind, "names": list(names)}
        labels = labels.to(device)
    else:
        label_info, labels = no_labels(), None
    if images.shape[0] < 1:
        raise UserError("the training set is empty; check --dataset, --class and --data-dir")
    return images.to(device), labels, label_info


def lr_at(step, tcfg):
    """Linear warm-up to the base rate, then constant (Ho et al.)."""
    return tcfg.lr * min(1.0, (step + 1) / max(1, tcfg.warmup))


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


# --- stopping: signals and non-finite losses ---------------------------------------------------------------------
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

    def check(self, run, last_saved):
        bad = dist.all_reduce_(self.first_bad.clone(), "min").item()
        if bad != NO_BAD_STEP:
            kept = (f"the last good checkpoint {run.ckpt} (step {last_saved}) is kept" if last_saved is not None
                    else "no checkpoint had been written yet")
            raise UserError(f"the loss or its gradient became NaN/Inf at step {bad}; training stopped and {kept}; "
                            "lower --lr, check the data, or pass --skip-nonfinite to skip such steps")


# --- resuming ------------------------------------------------------------------------------------------------
def load_run_checkpoint(run, cfg, kind, label_info):
    """The run folder's checkpoint, checked to belong to this run (kind, config, labels); None for a new run."""
    if not os.path.exists(run.ckpt):
        return None
    ckpt = load_checkpoint(run.ckpt)
    if ckpt["kind"] != kind:
        raise UserError(f"{run.ckpt} is a {ckpt['kind']} checkpoint, but this is a {kind} run; "
                        "use a new --out folder")
    diffs = config_differences(ckpt["config"], cfg.to_dict())
    if diffs:
        raise UserError(f"{run.out} holds a run with another config ({'; '.join(diffs[:3])}); "
                        "refusing to mix runs: use a new --out folder or the same flags")
    if ckpt["labels"] != label_info:
        raise UserError(f"{run.out} was trained on other labels ({ckpt['labels']['names']}); use a new --out")
    return ckpt


def check_same_step(step, run, device):
    """Under torchrun every process must resume from the same checkpoint (a folder all machines share)."""
    if not dist.all_equal(step, device):
        raise UserError(f"the processes found different checkpoints in {run.out} (this one: step {step}); "
                        "put --out on a filesystem that every machine shares")


def grid_condition(label_info, n, device):
    """The grids' conditions: classes cycled [n], or held-out label sets [n, K] (generalisation, not memory)."""
    if label_info["kind"] == "class":
        return torch.arange(n, device=device) % len(label_info["names"])
    if label_info["kind"] == "multilabel":
        from .shapes import eval_label_sets, objects_to_multi_hot

        sets = eval_label_sets()
        return torch.from_numpy(np.stack([objects_to_multi_hot(sets[i % len(sets)]) for i in range(n)])).to(device)
    return None


@torch.no_grad()
def save_grid(ema_model, diffusion, cfg, label_info, device, path):
    """An EMA sample grid with fixed seeds (the same images at every step, so progress is visible)."""
    n = cfg.train.grid_size
    cond = grid_condition(label_info, n, device)
    shape = (3, cfg.data.image_size, cfg.data.image_size)
    x = ddim_sample(diffusion, guided(ema_model, cond), shape, list(range(n)), device, steps=cfg.train.grid_steps,
                    eta=cfg.train.grid_eta)
    save_png(make_grid(to_uint8(x)), path)


def batch_randomness(diffusion, cfg, gen, global_b, device):
    """Flips [B], timesteps [B], noise [B, 3, S, S] and condition drops [B] for the whole *global* batch.

    Every process draws all of them from the same generator and keeps its own slice, so N processes see exactly
    the numbers one process would: with DDP's gradient average over equal shards, the same update.
    """
    s = cfg.data.image_size
    flip = torch.rand(global_b, device=device, generator=gen) < data_mod.FLIP_PROB if cfg.data.flip else None
    t = diffusion.sample_timesteps(global_b, device, gen)
    noise = torch.randn((global_b, 3, s, s), device=device, generator=gen)
    drop = torch.rand(global_b, device=device, generator=gen) < cfg.cond.cond_drop if cfg.cond.conditional else None
    return flip, t, noise, drop


# --- the loop ----------------------------------------------------------------------------------------------------
def train(cfg, out, device, log=say, skip_nonfinite=False):
    """Train (or resume) the diffusion run described by `cfg` in folder `out` on `device`.

    Returns the RunFolder; its `stopped_by` is the name of the signal that stopped training early, or None.
    """
    world, rank = dist.world_size(), dist.rank()
    check_train_flags(cfg, world)
    run = RunFolder(out)
    run.check_writable()
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    images, labels, label_info = load_training_data(cfg, device)
    model = build_unet(cfg, label_info).to(device)
    torch.manual_seed(tcfg.seed + rank)  # dropout: each process its own masks (the weights above are identical)
    diffusion = build_diffusion(cfg)
    ema = EMA(model, tcfg.ema_decay, tcfg.ema_warmup)
    fused = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, **fused)
    sampler = data_mod.BatchSampler(images.shape[0], tcfg.batch_size, tcfg.seed, rank, world)
    gen = torch.Generator(device=device).manual_seed(tcfg.seed)
    guard = NonFiniteGuard(device, skip_nonfinite)
    step, last_saved = 0, None

    ckpt = load_run_checkpoint(run, cfg, "ddpm", label_info)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["models"]["model"])
            ema.load_state_dict(ckpt["models"]["ema"])
            opt.load_state_dict(ckpt["optimizers"]["opt"])
            sampler.load_state_dict(ckpt["sampler"])
            restore_rng_state(ckpt["rng"], gen, tcfg.seed)
            step = last_saved = int(ckpt["step"])
            guard.skipped = int(ckpt.get("skipped_steps", 0))
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            detail = (str(e).strip().splitlines() or [""])[0][:120]
            raise UserError(f"{run.ckpt} is damaged ({e.__class__.__name__}: {detail}); move it away to "
                            "start over, or use a new --out folder") from None
        del ckpt
        log(f"resuming {run.out} at step {step}")
    check_same_step(step, run, device)
    run.remove_stale_temp()
    run.trim_log(step)  # a killed run may have logged past its last checkpoint
    run.write_config(cfg)  # the first write: an unwritable folder is reported before training starts
    nparams = sum(p.numel() for p in model.parameters())
    procs = f" × {world} processes" if world > 1 else ""
    log(f"training {cfg.preset} U-Net ({nparams / 1e6:.2f} M parameters) on {images.shape[0]} images "
        f"of {cfg.data.image_size}px, {device.type}{procs}, batch {tcfg.batch_size}, {tcfg.steps} steps → {run.out}")

    def checkpoint(step):
        state = dict(kind="ddpm", config=cfg.to_dict(), labels=label_info, step=step,
                     models=dict(model=model.state_dict(), ema=ema.state_dict()), optimizers=dict(opt=opt.state_dict()),
                     rng=gathered_rng_state(gen), sampler=sampler.state_dict(), skipped_steps=guard.skipped)
        if dist.is_main():
            save_checkpoint(run.ckpt, state)

    ddp_model = dist.wrap(model, device)  # the same module in one process

    def model_step(x, t, noise, cond, drop):
        """Forward and backward: (loss [], gradient norm []); DDP averages the gradients during backward."""
        with autocast(device):
            terms = diffusion.training_losses(lambda xt, tt: ddp_model(xt, tt, cond, drop), x, t, noise)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        return loss.detach(), grad_norm.detach()

    step_fn = torch.compile(model_step) if tcfg.compile else model_step
    model.train()
    local = tcfg.batch_size // world
    shard = slice(rank * local, (rank + 1) * local)  # this process's part of every global batch
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync until a report
    t0, n_since, n_updates = time.perf_counter(), 0, 0
    run.stopped_by = None
    with StopSignals() as signals:
        while step < tcfg.steps:
            idx = sampler.next().to(device)
            x = data_mod.to_float(images[idx])
            flip, t, noise, drop = (None if r is None else r[shard]
                                    for r in batch_randomness(diffusion, cfg, gen, tcfg.batch_size, device))
            if flip is not None:
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            cond = None if labels is None else labels[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tcfg)
            loss, grad_norm = step_fn(x, t, noise, cond, drop)
            if not skip_nonfinite:
                guard.record(step + 1, loss, grad_norm)
            if not skip_nonfinite or guard.step_ok(loss, grad_norm):
                opt.step()
                ema.update(model, step)
                loss_sum += loss
                n_updates += 1
            step += 1
            n_since += 1

            stop = signals.should_stop(step, device) and step < tcfg.steps
            report, grid, save = due(step, tcfg, stop)
            if report or grid or save:
                guard.check(run, last_saved)  # nothing is logged or saved after a NaN/Inf
            if report:
                # Mean over the steps taken since the last report, averaged over the processes' shards.
                loss_avg = dist.all_reduce_(loss_sum).item() / world / n_updates if n_updates else float("nan")
                ips, eta = throughput(n_since, tcfg.batch_size, time.perf_counter() - t0, tcfg.steps - step)
                skipped = f" | {guard.skipped} NaN/Inf steps skipped" if guard.skipped else ""
                log(f"step {step}/{tcfg.steps} | loss {loss_avg:.4f} | lr {lr_at(step - 1, tcfg):.2e} | "
                    f"{ips:.1f} img/s | ETA {eta}{skipped}")
                run.append_log(dict(step=step, loss=loss_avg, lr=lr_at(step - 1, tcfg), img_per_s=ips,
                                    skipped_steps=guard.skipped))
                loss_sum.zero_()
                t0, n_since, n_updates = time.perf_counter(), 0, 0
            if grid and dist.is_main():
                save_grid(ema.model, diffusion, cfg, label_info, device, run.grid_path(step))
            if save:
                checkpoint(step)
                last_saved = step
            if stop:
                run.stopped_by = signals.received or "a signal to another process"
                log(f"stopped by {run.stopped_by} at step {step}; checkpoint {run.ckpt} saved; "
                    "run the same command to resume")
                break
    return run
