"""The diffusion training loop: in-memory data, per-image timesteps, AdamW with warm-up, EMA, exact resume.

A run folder holds everything of one run:
    runs/<name>/ckpt.pt       latest checkpoint (atomic; resuming reads it)
    runs/<name>/config.json   the run's config, for people to read
    runs/<name>/log.jsonl     one JSON line per progress report
    runs/<name>/samples/      EMA sample grids, step_0001000.png …
Running the same command again resumes from ckpt.pt: step, weights, EMA, optimizer, RNG states and data order.
"""
import json
import math
import os
import sys
import time

import torch

from . import data as data_mod
from .checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint
from .config import config_differences
from .devices import autocast
from .ema import EMA
from .errors import UserError
from .files import atomic_write_bytes, check_output_dir
from .imageio import make_grid, save_png, to_uint8
from .models import build_diffusion, build_unet, no_labels
from .samplers import ddim_sample, guided


# --- the run folder: paths, log, progress ------------------------------------------------------------------------
class RunFolder:
    def __init__(self, out):
        self.out = check_output_dir(out)
        self.ckpt = os.path.join(out, CKPT_NAME)
        self.log = os.path.join(out, "log.jsonl")
        self.config = os.path.join(out, "config.json")
        self.samples = os.path.join(out, "samples")

    def write_config(self, cfg):
        atomic_write_bytes(self.config, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())

    def trim_log(self, step):
        """Keep only log lines up to `step` (the resumed checkpoint), dropping any half-written last line."""
        if not os.path.exists(self.log):
            return
        kept = []
        with open(self.log, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("step", 0) <= step:
                    kept.append(json.dumps(rec) + "\n")
        atomic_write_bytes(self.log, "".join(kept).encode())

    def append_log(self, record):
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def grid_path(self, step):
        return os.path.join(self.samples, f"step_{step:07d}.png")


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def say(msg):
    print(msg, file=sys.stderr, flush=True)


# --- data and conditioning -----------------------------------------------------------------------------------
def load_training_data(cfg, device):
    """uint8 images [N, 3, S, S] on `device` (the whole set lives there) and the labels description."""
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


def rng_state(gen):
    state = {"torch": torch.get_rng_state(), "train": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["train"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def save_grid(ema_model, diffusion, cfg, label_info, device, path):
    """An EMA sample grid with fixed seeds (the same images at every step, so progress is visible)."""
    n = cfg.train.grid_size
    cond = None
    if label_info["kind"] == "class":
        cond = torch.arange(n, device=device) % len(label_info["names"])  # cycle through the classes
    elif label_info["kind"] == "multilabel":
        from .shapes import eval_label_sets, objects_to_multi_hot

        sets = eval_label_sets()  # held-out label sets: the grid shows generalisation, not memorisation
        cond = torch.tensor([objects_to_multi_hot(sets[i % len(sets)]) for i in range(n)], device=device)
    shape = (3, cfg.data.image_size, cfg.data.image_size)
    x = ddim_sample(diffusion, guided(ema_model, cond), shape, list(range(n)), device, steps=cfg.train.grid_steps)
    save_png(make_grid(to_uint8(x)), path)


# --- the loop ----------------------------------------------------------------------------------------------------
def train(cfg, out, device, log=say):
    """Train (or resume) the diffusion run described by `cfg` in folder `out` on `device`."""
    run = RunFolder(out)
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    images, labels, label_info = load_training_data(cfg, device)
    model = build_unet(cfg, label_info).to(device)
    diffusion = build_diffusion(cfg)
    ema = EMA(model, tcfg.ema_decay, tcfg.ema_warmup)
    fused = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, **fused)
    sampler = data_mod.BatchSampler(images.shape[0], tcfg.batch_size, tcfg.seed)
    gen = torch.Generator(device=device).manual_seed(tcfg.seed)
    step = 0

    if os.path.exists(run.ckpt):
        ckpt = load_checkpoint(run.ckpt)
        diffs = config_differences(ckpt["config"], cfg.to_dict())
        if ckpt["kind"] != "ddpm" or diffs:
            raise UserError(f"{run.out} holds a run with another config ({'; '.join(diffs[:3]) or ckpt['kind']}); "
                            "refusing to mix runs: use a new --out folder or the same flags")
        if ckpt["labels"] != label_info:
            raise UserError(f"{run.out} was trained on other labels ({ckpt['labels']['names']}); use a new --out")
        model.load_state_dict(ckpt["models"]["model"])
        ema.load_state_dict(ckpt["models"]["ema"])
        opt.load_state_dict(ckpt["optimizers"]["opt"])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"], gen)
        step = ckpt["step"]
        run.trim_log(step)
        log(f"resuming {run.out} at step {step}")
    nparams = sum(p.numel() for p in model.parameters())
    log(f"training {cfg.preset} U-Net ({nparams / 1e6:.2f} M parameters) on {images.shape[0]} images "
        f"of {cfg.data.image_size}px, {device.type}, batch {tcfg.batch_size}, {tcfg.steps} steps → {run.out}")
    run.write_config(cfg)

    def checkpoint(step):
        save_checkpoint(run.ckpt, dict(
            kind="ddpm", config=cfg.to_dict(), labels=label_info, step=step,
            models=dict(model=model.state_dict(), ema=ema.state_dict()), optimizers=dict(opt=opt.state_dict()),
            rng=rng_state(gen), sampler=sampler.state_dict()))

    def model_step(x, t, noise, cond, drop):
        with autocast(device):
            terms = diffusion.training_losses(lambda xt, tt: model(xt, tt, cond, drop), x, t, noise)
        loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        return loss.detach()

    step_fn = torch.compile(model_step) if tcfg.compile else model_step
    model.train()
    loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync until a report
    t0, n_since = time.perf_counter(), 0
    while step < tcfg.steps:
        idx = sampler.next().to(device)
        x = data_mod.to_float(images[idx])
        if cfg.data.flip:
            x = data_mod.random_flip(x, gen)
        b = x.shape[0]
        t = diffusion.sample_timesteps(b, device, gen)
        noise = torch.randn(x.shape, device=device, generator=gen)
        cond = drop = None
        if labels is not None:
            cond = labels[idx]
            drop = torch.rand(b, device=device, generator=gen) < cfg.cond.cond_drop
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        loss_sum += step_fn(x, t, noise, cond, drop)
        ema.update(model, step)
        step += 1
        n_since += 1

        if step % tcfg.log_every == 0 or step == tcfg.steps:
            loss = (loss_sum / n_since).item()
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} between steps {step - n_since + 1} and {step}; "
                                f"the last good checkpoint {run.ckpt} is kept; lower --lr or check the data")
            dt = time.perf_counter() - t0
            ips = n_since * b / dt
            eta = format_eta((tcfg.steps - step) * b / ips)
            log(f"step {step}/{tcfg.steps} | loss {loss:.4f} | lr {lr_at(step - 1, tcfg):.2e} | "
                f"{ips:.1f} img/s | ETA {eta}")
            run.append_log(dict(step=step, loss=loss, lr=lr_at(step - 1, tcfg), img_per_s=ips))
            loss_sum.zero_()
            t0, n_since = time.perf_counter(), 0
        if step % tcfg.sample_every == 0 or step == tcfg.steps:
            save_grid(ema.model, diffusion, cfg, label_info, device, run.grid_path(step))
        if step % tcfg.save_every == 0 or step == tcfg.steps:
            checkpoint(step)
    return run
