"""The DCGAN training loop: the same run folder, progress lines, EMA and exact resume as the diffusion loop.

    runs/<name>/ckpt.pt       kind "dcgan": models {generator, discriminator, ema}, optimizers {g, d}
    runs/<name>/config.json   the run's config
    runs/<name>/log.jsonl     one JSON line per progress report (D and G losses, D(x), D(G(z)), img/s)
    runs/<name>/samples/      EMA generator grids with fixed seeds, step_0001000.png …
Running the same command again resumes from ckpt.pt (weights, EMA, both optimizers, RNG states and data order), so
an interrupted and resumed run ends with the same weights as an uninterrupted one.

Of the training settings the GAN uses steps, batch_size, lr, ema_decay, ema_warmup, seed and the logging/saving
cadence; warmup, grad_clip, weight_decay, the grid sampler settings and compile are diffusion-only (Adam at a
constant rate is the DCGAN recipe), as are the unet, diffusion and cond_drop settings. Changing any of those for a
DCGAN is refused.
"""
import time
from copy import deepcopy
from dataclasses import replace

import torch

from . import budget
from . import data as data_mod
from .config import build_config
from .dcgan import GAN, gan_train_step, instance_noise_std, make_optimizers, sample_z
from .ema import EMA
from .errors import UserError
from .imageio import make_grid, save_png, to_pixels
from .models import build_gan, grid_condition
from .runs import Run, say, throughput
from .stopping import StopSignals

# Config fields that only a diffusion model reads: setting one for a DCGAN is a mistake we report.
DIFFUSION_ONLY_SECTIONS = ("unet", "diffusion")
DIFFUSION_ONLY_FIELDS = (("cond", "cond_drop"), ("train", "warmup"), ("train", "grad_clip"),
                         ("train", "weight_decay"), ("train", "grid_steps"), ("train", "grid_eta"),
                         ("train", "grid_sampler"), ("train", "compile"))
BN_CALIBRATION_IMAGES = 1024  # latents used to re-estimate the EMA generator's BatchNorm statistics
BN_CALIBRATION_BATCH = 256


def _flag(name):
    return "--" + name.replace("_", "-")


def check_gan_config(cfg):
    """UserError naming every diffusion-only flag whose value differs from the preset's (so the user set it).

    train.py passes only the built config, so "set by the user" means "differs from what the preset gives"; a flag
    repeating the preset's value changes nothing and is let through.
    """
    base, given = build_config(cfg.preset, {}, model=cfg.model).to_dict(), cfg.to_dict()
    keys = [(s, k) for s in DIFFUSION_ONLY_SECTIONS for k in given[s]] + list(DIFFUSION_ONLY_FIELDS)
    bad = [_flag(k) for s, k in keys if given[s][k] != base[s][k]]
    if bad:
        raise UserError(f"{' '.join(bad)} only apply to diffusion models; drop them for --model dcgan "
                        "(the GAN's own flags are --z-dim, --g-channels, --d-channels, --beta1, --label-smoothing, "
                        "--instance-noise, --noise-anneal-steps)")


# --- sampling from the EMA generator ---------------------------------------------------------------------------
@torch.no_grad()
def calibrate_batchnorm(G, labels, device):
    """Re-estimate G's BatchNorm running statistics for its *current* weights ("standing statistics", BigGAN).

    The EMA copies the raw generator's running mean/var, which belong to the raw weights, not to the averaged
    ones; sampling in eval mode with them shifts every activation. We reset them and average the batch statistics
    of BN_CALIBRATION_IMAGES fixed latents (momentum None = a plain cumulative average), with conditions taken from
    the training labels [N] or [N, K] in order, so the result is deterministic and leaves the training RNG alone.
    """
    bns = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    G.train()
    for start in range(0, BN_CALIBRATION_IMAGES, BN_CALIBRATION_BATCH):
        seeds = range(start, start + BN_CALIBRATION_BATCH)
        cond = None if labels is None else labels[torch.tensor(seeds) % labels.shape[0]].to(device)
        G(sample_z(seeds, G.z_dim, device), cond)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    G.eval()


@torch.no_grad()
def save_gan_grid(G, cfg, label_info, device, path):
    """A grid of G's images for seeds 0..grid_size-1 (the same latents at every step, so progress is visible)."""
    n = cfg.train.grid_size
    x = G(sample_z(n, G.z_dim, device), grid_condition(label_info, n, device))
    save_png(make_grid(to_pixels(x)), path)


# --- the loop ----------------------------------------------------------------------------------------------------
def budget_probe(run, gan):
    """probe() for budget.fix_length: seconds per DCGAN step (both networks) and per grid, timed on copies."""
    cfg, device, data = run.cfg, run.device, run.data

    def probe():
        G, D = deepcopy(gan.G), deepcopy(gan.D)
        copy = GAN(G, D, *make_optimizers(G, D, cfg.gan, lr=cfg.train.lr))
        gen = torch.Generator(device).manual_seed(0)

        def one_step():
            idx = torch.randint(0, data.images.shape[0], (cfg.train.batch_size,), generator=gen, device=device)
            cond = None if data.labels is None else data.labels[idx]
            gan_train_step(copy, data_mod.to_float(data.images[idx]), cond, cfg.gan, 0, cfg.train.steps, gen)

        @torch.no_grad()
        def grid():
            calibrate_batchnorm(G, data.labels, device)
            G(sample_z(cfg.train.grid_size, G.z_dim, device), grid_condition(data.label_info, cfg.train.grid_size,
                                                                            device))

        sync = budget.sync_for(device)
        return budget.seconds_per_call(one_step, sync=sync), budget.seconds_per_call(grid, 1, 0, sync)

    return probe


def train_gan(cfg, out, device, log=say):
    """Train (or resume) the DCGAN run described by `cfg` in folder `out` on `device`; returns the runs.Run."""
    clock = budget.Clock()
    run = Run(cfg, out, "dcgan", device, log)  # every check; nothing is created yet
    check_gan_config(cfg)
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    data = run.load_data()
    with run.memory_guard():  # --g-channels 4096 may not fit: one line, and nothing created yet
        G, D = build_gan(cfg, data.label_info)
        G, D = G.to(device), D.to(device)
        ema = EMA(G, tcfg.ema_decay, tcfg.ema_warmup)
    gan = GAN(G, D, *make_optimizers(G, D, cfg.gan, lr=tcfg.lr))  # constant rate: no warm-up, no clipping
    run.cfg = replace(cfg, train=replace(tcfg, steps=budget.fix_length(run, clock, budget_probe(run, gan)).steps))
    models, optimizers = dict(generator=G, discriminator=D, ema=ema), dict(g=gan.opt_g, d=gan.opt_d)
    with run.begin(models, optimizers) as step, StopSignals() as signals:  # a signal: checkpoint, then stop
        _loop(run, step, signals, gan, ema)
    return run


def _loop(run, step, signals, gan, ema):
    cfg, device, tcfg, gen, data, log = run.cfg, run.device, run.cfg.train, run.gen, run.data, run.log
    G, D = gan.G, gan.D
    n_g, n_d = (sum(p.numel() for p in net.parameters()) / 1e6 for net in (G, D))
    log(f"training {cfg.preset} DCGAN (G {n_g:.3g} M, D {n_d:.3g} M parameters) on {data.images.shape[0]} images "
        f"of {cfg.data.image_size}px, {device.type}, batch {tcfg.batch_size}, lr {tcfg.lr:g}, {tcfg.steps} steps "
        f"→ {run.out}")
    G.train()
    D.train()
    sums = torch.zeros(4, device=device)  # d_loss, g_loss, D(x), D(G(z)) summed on the device: no sync per step
    t0, n_since = time.perf_counter(), 0
    while step < tcfg.steps:
        idx = run.batches.next().to(device)
        x = data_mod.to_float(data.images[idx])
        if cfg.data.flip:
            x = data_mod.random_flip(x, gen)
        b = x.shape[0]
        cond = None if data.labels is None else data.labels[idx]
        out = gan_train_step(gan, x, cond, cfg.gan, step, tcfg.steps, gen)
        sums += torch.stack([out["d_loss"], out["g_loss"], out["d_real"], out["d_fake"]])
        run.guard.record(step + 1, out["d_loss"], out["g_loss"])  # on the device: no sync per step
        ema.update(G, step)
        step += 1
        n_since += 1

        report, grid_due, save_due, stop = run.due(step, signals)  # names the first NaN/Inf step, if any
        if report:
            d_loss, g_loss, d_real, d_fake = (sums / n_since).tolist()
            ips, eta = throughput(n_since, b, time.perf_counter() - t0, tcfg.steps - step)
            noise = instance_noise_std(cfg.gan, step - 1, tcfg.steps)
            log(f"step {step}/{tcfg.steps} | D {d_loss:.3f} | G {g_loss:.3f} | D(x) {d_real:.2f} | "
                f"D(G(z)) {d_fake:.2f} | noise {noise:.3f} | {ips:.1f} img/s | ETA {eta}")
            run.folder.append_log(dict(step=step, d_loss=d_loss, g_loss=g_loss, d_real=d_real, d_fake=d_fake,
                                       instance_noise=noise, img_per_s=ips))
            sums.zero_()
            t0, n_since = time.perf_counter(), 0
        if grid_due or save_due:
            # Only the EMA copy's buffers change; EMA.update overwrites them next step: training is unaffected.
            calibrate_batchnorm(ema.model, data.labels, device)
        if grid_due:
            save_gan_grid(ema.model, cfg, data.label_info, device, run.folder.grid_path(step))
        if save_due:
            run.save(step)
        if stop:
            run.stop(step, signals)
            break
