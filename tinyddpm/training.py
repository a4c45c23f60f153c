"""The diffusion training loop: in-memory data, per-image timesteps, AdamW with warm-up, EMA, exact resume.

The run folder, resume, RNG state, signals, the NaN/Inf guard and the cadence are runs.py's, shared with the DCGAN
loop (gan_training.py); this module is the diffusion step and its sample grids. Under torchrun
(tinyddpm/distributed.py) every process runs this same loop on its shard of each global batch;
DistributedDataParallel averages the gradients and only rank 0 writes files.
"""
import math
import time

import torch

from . import data as data_mod
from . import distributed as dist
from .devices import autocast
from .ema import EMA, Snapshot
from .errors import UserError
from .imageio import make_grid, save_png, to_pixels
from .models import build_diffusion, build_unet, grid_condition
from .guidance import classifier_free
from .runs import Run, StopSignals, say, throughput
from .samplers import ImageNoise, SamplerOptions, sample


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
def save_grid(ema_model, diffusion, cfg, label_info, device, path):
    """An EMA sample grid with fixed seeds (the same images at every step, so progress is visible)."""
    t = cfg.train
    cond = grid_condition(label_info, t.grid_size, device)
    noise = ImageNoise(range(t.grid_size), (3, cfg.data.image_size, cfg.data.image_size), device)
    x = sample(diffusion, classifier_free(ema_model, cond), grid_sampler(cfg), noise)
    save_png(make_grid(to_pixels(x)), path)


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

    Returns the runs.Run; its `stopped_by` is the name of the signal that stopped training early, or None.
    """
    run = Run(cfg, out, "ddpm", device, log, skip_nonfinite)  # every check; nothing is created yet
    grid_sampler(cfg)
    world, rank, tcfg = dist.world_size(), dist.rank(), cfg.train
    torch.manual_seed(tcfg.seed)
    data = run.load_data()
    model = build_unet(cfg, data.label_info).to(device)
    torch.manual_seed(tcfg.seed + rank)  # dropout: each process its own masks (the weights above are identical)
    diffusion = build_diffusion(cfg)
    ema, guide = EMA(model, tcfg.ema_decay, tcfg.ema_warmup), Snapshot()
    fused = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, **fused)
    with run.begin(dict(model=model, ema=ema, guide=guide), dict(opt=opt)) as step, StopSignals() as signals:
        _loop(run, step, signals, model, ema, guide, opt, diffusion, data, log)
    return run


def guide_step(tcfg):
    """The step after which the EMA weights are kept as the autoguidance model (ema.Snapshot), or None."""
    return max(1, round(tcfg.guide_at * tcfg.steps)) if tcfg.guide_at > 0 else None


def _loop(run, step, signals, model, ema, guide, opt, diffusion, data, log):
    cfg, device, tcfg, guard = run.cfg, run.device, run.cfg.train, run.guard
    keep_at = guide_step(tcfg)
    world, rank, skip_nonfinite = dist.world_size(), dist.rank(), guard.skip
    nparams = sum(p.numel() for p in model.parameters())
    procs = f" × {world} processes" if world > 1 else ""
    log(f"training {cfg.preset} U-Net ({nparams / 1e6:.2f} M parameters) on {data.images.shape[0]} images "
        f"of {cfg.data.image_size}px, {device.type}{procs}, batch {tcfg.batch_size}, {tcfg.steps} steps → {run.out}")
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
    images, labels, gen = data.images, data.labels, run.gen
    while step < tcfg.steps:
        idx = run.sampler.next().to(device)
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
        if step == keep_at and not guide.taken:
            # Only at this step: a run resumed past it without one (an older checkpoint, a changed --guide-at)
            # gets no snapshot rather than one of another age.
            guide.take(ema, step)
            log(f"kept the EMA weights of step {step} as the autoguidance model")

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
            save_grid(ema.model, diffusion, cfg, data.label_info, device, run.folder.grid_path(step))
        if save:
            run.save(step)
        if stop:
            run.stop(step, signals)
            break
