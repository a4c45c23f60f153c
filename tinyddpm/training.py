"""The diffusion training loop: in-memory data, per-image timesteps, AdamW with warm-up, EMA, exact resume.

The run folder, resume, RNG state, signals, the NaN/Inf guard and the cadence are runs.py's, shared with the DCGAN
loop (gan_training.py); this module is the diffusion step and its sample grids. Under torchrun
(tinyddpm/distributed.py) every process runs this same loop on its shard of each global batch;
DistributedDataParallel averages the gradients and only rank 0 writes files.
"""
import math
import time
from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import budget
from . import data as data_mod
from . import distributed as dist
from .devices import autocast
from .ema import EMA, Snapshot
from .errors import UserError
from .guidance import classifier_free
from .imageio import make_grid, save_png, to_pixels
from .models import build_diffusion, build_guide, build_unet, grid_condition
from .posthoc_ema import PowerEMA, drop_after
from .runs import Run, say, throughput
from .samplers import ImageNoise, SamplerOptions, sample
from .stopping import StopSignals


def lr_at(step, tcfg):
    """The learning rate of optimizer step `step` (0-based): a linear warm-up to --lr, then constant (Ho et al.) or
    a cosine decay that reaches 0 at the last step (--lr-decay cosine; the DDPM replication's schedule)."""
    warm = min(1.0, (step + 1) / max(1, tcfg.warmup))
    if tcfg.lr_decay == "constant" or step < tcfg.warmup:
        return tcfg.lr * warm
    progress = (step - tcfg.warmup) / max(1, tcfg.steps - tcfg.warmup)  # 0 after the warm-up … 1 at the end
    return tcfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def grid_sampler(cfg):
    """The sampler of the training grids (--grid-sampler, --grid-steps, --grid-eta), checked when the run starts
    rather than at its first grid. ddpm takes all T steps; η applies to ddim only."""
    t = cfg.train
    options = SamplerOptions(t.grid_sampler, None if t.grid_sampler == "ddpm" else t.grid_steps,
                             eta=t.grid_eta if t.grid_sampler == "ddim" else 0.0)
    try:
        return options.check(cfg.diffusion.timesteps)
    except UserError as e:
        raise UserError(f"the training grids (--grid-sampler {t.grid_sampler}, --grid-steps {t.grid_steps}): {e}") \
            from None


@torch.no_grad()
def grid_images(ema_model, diffusion, cfg, label_info, device):
    """uint8 [grid_size, S, S, 3]: EMA samples with fixed seeds (the same images at every step, so progress is
    visible)."""
    t = cfg.train
    cond = grid_condition(label_info, t.grid_size, device)
    noise = ImageNoise(range(t.grid_size), (3, cfg.data.image_size, cfg.data.image_size), device)
    return to_pixels(sample(diffusion, classifier_free(ema_model, cond), grid_sampler(cfg), noise))


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


# --- one step -----------------------------------------------------------------------------------------------
@dataclass
class Nets:
    """What a diffusion step updates: the network (DDP-wrapped under torchrun as `ddp`), its EMA copy, the
    autoguidance snapshot and the optimizer; `narrow`: the narrower guide network trained alongside
    (--guide-channels) with its own EMA and optimizer, or None (the snapshot is then the main network's EMA);
    `posthoc`: the main network's power-function EMAs (--posthoc-ema), or None."""
    model: torch.nn.Module
    ddp: torch.nn.Module
    ema: EMA
    guide: Snapshot
    opt: torch.optim.Optimizer
    narrow: Optional["Nets"] = None
    posthoc: Optional[PowerEMA] = None

    def checkpointed(self):
        """(models, optimizers): what a checkpoint holds, by name."""
        models, optimizers = dict(model=self.model, ema=self.ema, guide=self.guide), dict(opt=self.opt)
        if self.posthoc is not None:
            models.update(posthoc=self.posthoc)
        if self.narrow is not None:
            models.update(guide_model=self.narrow.model, guide_ema=self.narrow.ema)
            optimizers.update(guide_opt=self.narrow.opt)
        return models, optimizers


def make_nets(cfg, model, device, narrow_model=None, posthoc=True):
    """EMA, an empty snapshot, AdamW (fused on CUDA, foreach on the CPU) and, with --posthoc-ema, the power-function
    EMAs around `model`; EMA, snapshot and AdamW around `narrow_model` when there is one (the snapshot then holds its
    EMA's weights)."""
    tcfg = cfg.train
    fused = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, **fused)
    nets = Nets(model, dist.wrap(model, device), EMA(model, tcfg.ema_decay, tcfg.ema_warmup), Snapshot(), opt)
    if narrow_model is not None:
        nets.narrow, nets.guide.of = make_nets(cfg, narrow_model, device, posthoc=False), "guide_ema"
    if posthoc and tcfg.posthoc_ema:
        nets.posthoc = PowerEMA(model, tcfg.posthoc_ema)
    return nets


def make_step(cfg, nets, diffusion, data, device):
    """The training step: step_fn(idx [b] indices into the data, gen, narrow=False) → (loss [], gradient norm []) of
    the main network, and of the narrow guide network on the same batch (when `narrow`; else None), after forward
    and backward of this process's shard of a global batch (the optimizer steps are the caller's, so a NaN/Inf step
    can be skipped). DDP averages the gradients during backward."""
    tcfg, world, rank = cfg.train, dist.world_size(), dist.rank()
    local = tcfg.batch_size // world
    shard = slice(rank * local, (rank + 1) * local)  # this process's part of every global batch

    def loss_and_grads(n):
        def model_step(x, t, noise, cond, drop):
            with autocast(device):
                terms = diffusion.training_losses(lambda xt, tt: n.ddp(xt, tt, cond, drop), x, t, noise)
            loss = terms["loss"].mean()
            n.opt.zero_grad(set_to_none=True)
            loss.backward()
            params = n.model.parameters()
            if tcfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            return loss.detach(), grad_norm.detach()

        return torch.compile(model_step) if tcfg.compile else model_step

    main = loss_and_grads(nets)
    guide = None if nets.narrow is None else loss_and_grads(nets.narrow)

    def step_fn(idx, gen, narrow=False):
        x = data_mod.to_float(data.images[idx])
        flip, t, noise, drop = (None if r is None else r[shard]
                                for r in batch_randomness(diffusion, cfg, gen, tcfg.batch_size, device))
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        batch = (x, t, noise, None if data.labels is None else data.labels[idx], drop)
        return main(*batch), guide(*batch) if narrow else None

    return step_fn


# --- the time budget -----------------------------------------------------------------------------------------
def seconds_per_step(cfg, nets, diffusion, data, device):
    """Wall seconds of one whole training step (forward, backward, AdamW, EMA) of copies of `nets`, as the run will
    average them (the guide network trains for guide_at of the steps), and the copies (for budget_probe's grid)."""
    copy = make_nets(cfg, deepcopy(nets.model), device, nets.narrow and deepcopy(nets.narrow.model))
    step_fn, gen = make_step(cfg, copy, diffusion, data, device), torch.Generator(device).manual_seed(0)

    def one_step(narrow=False):
        step_fn(torch.randint(0, data.images.shape[0], (cfg.train.batch_size,), generator=gen, device=device),
                gen, narrow)
        for n in (copy, copy.narrow) if narrow else (copy,):
            n.opt.step()
            n.ema.update(n.model, 0)
        if copy.posthoc is not None:
            copy.posthoc.update(copy.model, 1)

    sync = budget.sync_for(device)
    step_s = budget.seconds_per_call(one_step, sync=sync)
    if copy.narrow is not None:  # the guide network trains until the snapshot: guide_at of the steps
        step_s += cfg.train.guide_at * (budget.seconds_per_call(lambda: one_step(True), sync=sync) - step_s)
    return step_s, copy


def budget_probe(run, nets, diffusion):
    """probe() for budget.fix_length: seconds per training step and per grid, timed on copies of the networks."""
    cfg, device, data = run.cfg, run.device, run.data

    def probe():
        step_s, copy = seconds_per_step(cfg, nets, diffusion, data, device)
        grid = lambda: grid_images(copy.ema.model, diffusion, cfg, data.label_info, device)  # noqa: E731
        return step_s, budget.seconds_per_call(grid, 1, 0, budget.sync_for(device))

    return probe


# --- the loop ----------------------------------------------------------------------------------------------------
def train(cfg, out, device, log=say, skip_nonfinite=False):
    """Train (or resume) the diffusion run described by `cfg` in folder `out` on `device`.

    Returns the runs.Run; its `stopped_by` is the name of the signal that stopped training early, or None.
    """
    clock = budget.Clock()
    run = Run(cfg, out, "ddpm", device, log, skip_nonfinite)  # every check; nothing is created yet
    grid_sampler(cfg)
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    data = run.load_data()
    with run.memory_guard():  # too big to build: one line naming the sizes to lower
        model = build_unet(cfg, data.label_info).to(device)
        narrow = build_guide(cfg, data.label_info).to(device) if tcfg.guide_channels else None
    torch.manual_seed(tcfg.seed + dist.rank())  # dropout: each process its own masks (the weights are identical)
    with run.memory_guard():
        diffusion, nets = build_diffusion(cfg), make_nets(cfg, model, device, narrow)
    length = budget.fix_length(run, clock, budget_probe(run, nets, diffusion))
    run.cfg = replace(cfg, train=replace(tcfg, steps=length.steps))
    refit = _refit(run, clock, length, narrow)
    with run.begin(*nets.checkpointed()) as step, StopSignals() as signals:
        _loop(run, step, signals, nets, diffusion, refit if step == 0 else None)
    return run


def _refit(run, clock, length, narrow):
    """budget.Refit at the warm-up's last step, when nothing depends on the count before it: the autoguidance
    snapshot comes after it under both counts. None when the probe's count stays: no new budget, a warm-up too short
    to time, or a narrow guide network (it trains only in the first guide_at of the steps, so the warm-up's steps
    cost more than the run's average)."""
    tcfg, end = run.cfg.train, run.cfg.train.warmup
    if narrow is not None or not budget.Refit.possible(length, end):
        return None
    after_end = lambda steps: (guide_step(replace(tcfg, steps=steps)) or end + 1) > end  # noqa: E731
    return budget.Refit(run, clock, length, end, after_end) if after_end(tcfg.steps) else None


def guide_step(tcfg):
    """The step after which the EMA weights are kept as the autoguidance model (ema.Snapshot), or None."""
    return max(1, round(tcfg.guide_at * tcfg.steps)) if tcfg.guide_at > 0 else None


def _loop(run, step, signals, nets, diffusion, refit=None):
    cfg, device, tcfg, guard, data, log = run.cfg, run.device, run.cfg.train, run.guard, run.data, run.log
    keep_at, world, skip_nonfinite = guide_step(tcfg), dist.world_size(), guard.skip
    if step and nets.guide.taken and nets.guide.state["step"] != keep_at:
        log(f"note: the autoguidance snapshot is the EMA of step {nets.guide.state['step']}, "
            f"{nets.guide.state['step'] / tcfg.steps:.2g} of the {tcfg.steps} steps now asked for (--guide-at "
            f"{tcfg.guide_at:g} would take it at step {keep_at}): sampling pushes away from that younger model")
    nparams = sum(p.numel() for p in nets.model.parameters())
    procs = f" × {world} processes" if world > 1 else ""
    log(f"training {cfg.preset} U-Net ({nparams / 1e6:.2f} M parameters) on {data.images.shape[0]} images "
        f"of {cfg.data.image_size}px, {device.type}{procs}, batch {tcfg.batch_size}, {tcfg.steps} steps → {run.out}")
    if nets.posthoc is not None and dist.is_main():
        drop_after(run.out, step)  # stored by a killed run past its checkpoint: this run stores them again
    step_fn = make_step(cfg, nets, diffusion, data, device)
    nets.model.train()
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync until a report
    t0, n_since, n_updates = time.perf_counter(), 0, 0
    while step < tcfg.steps:
        # The narrow guide network (if any) trains on the same batches until its snapshot is taken.
        trained = [nets] + ([nets.narrow] if nets.narrow is not None and not nets.guide.taken else [])
        for n in trained:
            for group in n.opt.param_groups:
                group["lr"] = lr_at(step, tcfg)
        (loss, grad_norm), guide_out = step_fn(run.batches.next().to(device), run.gen, len(trained) > 1)
        values = (loss, grad_norm, *(guide_out or ()))
        if not skip_nonfinite:
            guard.record(step + 1, *values)
        if not skip_nonfinite or guard.step_ok(*values):
            for n in trained:
                n.opt.step()
                n.ema.update(n.model, step)
            if nets.posthoc is not None:
                nets.posthoc.update(nets.model, step + 1)
            loss_sum += loss
            n_updates += 1
        step += 1
        n_since += 1
        if step == keep_at and not nets.guide.taken:
            # Only at this step: a run resumed past it without one (an older checkpoint) gets no snapshot rather
            # than one of another age.
            nets.guide.take(nets.ema if nets.narrow is None else nets.narrow.ema, step)
            what = "the narrow guide network's EMA" if nets.narrow else "the EMA weights"
            log(f"kept {what} of step {step} as the autoguidance model")
        steps = refit.at(step) if refit is not None else None
        if steps is not None:  # the budget's count, fitted again from this run's own warm-up (budget.Refit)
            run.cfg = cfg = replace(cfg, train=replace(tcfg, steps=steps))
            tcfg, keep_at = cfg.train, guide_step(cfg.train)
            run.folder.write_config(cfg)

        report, grid, save, stop = run.due(step, signals)
        if report:
            # Mean over the steps taken since the last report, averaged over the processes' shards.
            loss_avg = dist.all_reduce_(loss_sum).item() / world / n_updates if n_updates else float("nan")
            ips, eta = throughput(n_since, tcfg.batch_size, time.perf_counter() - t0, tcfg.steps - step)
            skipped = f" | {guard.skipped} NaN/Inf steps skipped" if guard.skipped else ""
            log(f"step {step}/{tcfg.steps} | loss {loss_avg:.4f} | lr {lr_at(step - 1, tcfg):.2e} | "
                f"{ips:.1f} img/s | ETA {eta}{skipped}")
            run.folder.append_log(dict(step=step, loss=loss_avg, lr=lr_at(step - 1, tcfg), img_per_s=ips,
                                       skipped_steps=guard.skipped))
            loss_sum.zero_()
            t0, n_since, n_updates = time.perf_counter(), 0, 0
        if grid and dist.is_main():
            save_png(make_grid(grid_images(nets.ema.model, diffusion, cfg, data.label_info, device)),
                     run.folder.grid_path(step))
        if save:
            run.save(step)
        if nets.posthoc is not None and (save or step % tcfg.posthoc_every == 0):
            guard.check(run.folder.ckpt, run.last_saved)  # as run.due: nothing is written after a NaN/Inf step
            if dist.is_main():
                nets.posthoc.store(run.out, step)
        if stop:
            run.stop(step, signals)
            break
