"""Three sections of benchmarks/gpu_evidence.py: training and sampling throughput, and the quality run (the FID
section is in gpu_fid.py).

Each section is `section_<name>(ev, res)`: it fills the dict `res` as it goes, one `ev.attempt(...)` per figure,
so a failing variant, or the section's time cap, keeps everything measured before it. `ev` (gpu_evidence.Evidence)
holds the sizes, device, folders and bundle.
"""
import contextlib
import gc
import json
import os
import shutil
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch

import bench_unet as bench  # the two U-Nets, synthetic batches, the train step, FLOPs, timing
from tinyddpm.config import PRESETS, build_config
from tinyddpm.devices import autocast
from tinyddpm.generate import DEFAULT_SAMPLER
from tinyddpm.unet import count_parameters

GIB = 2 ** 30
MODES = ("fp32", "bf16", "bf16-compile")  # training modes, as in bench_unet
SAMPLE_VARIANTS = ("eager", "cuda-graph", "compiled", "compiled+cuda-graph")  # cheap ones first
# diffusers as shipped (NCHW) and in channels_last (bench_unet's two rows); only the faster one is compiled.
DIFFUSERS = ("diffusers", "diffusers-cl")
GRAPH_WARMUP = 3  # eager calls on a side stream before a CUDA graph capture (cuDNN/cuBLAS pick their kernels)
LOOP_COMPILE_MIN_S = 100  # the real loop with --compile runs only if this much of the train section is left
SIGTERM_POLL_S = 0.1  # how often the quality run's clock looks whether train.py's signal handler is in place
REPORT_RETRY_MIN_S = 25  # a further report (DDIM η = 1) runs only if this much of the quality section is left
REPORT_PNGS = 2  # images copied to --out per report (the device tool returns at most 8 files in all)


class SectionTimeout(BaseException):
    """A section's time is up (BaseException, so that no sub-step's `except Exception` swallows it)."""


def one_line(e):
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0][:300]


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def timed_with_first(fn, iters, warmup, device):
    """(seconds of `iters` calls after `warmup` untimed ones, seconds of the untimed ones: compilation and all)."""
    t = time.perf_counter()
    seconds = bench.timed(fn, iters, warmup, device)
    return seconds, time.perf_counter() - t - seconds


def add_ratios(rows, key):
    """rows["tinyddpm/<v>"]["vs_diffusers"] = ours / the faster diffusers layout in the same variant (as bench_unet
    reports it), where both were measured."""
    for name, r in rows.items():
        system, variant = name.split("/", 1)
        peers = [rows.get(f"{d}/{variant}", {}).get(key) for d in DIFFUSERS]
        if system == "tinyddpm" and key in r and any(peers):
            r["vs_diffusers"] = r[key] / max(p for p in peers if p)


def faster_diffusers(rows, key, variant):
    """The diffusers layout that was faster in `variant` (the one worth compiling), or None."""
    rates = {d: rows.get(f"{d}/{variant}", {}).get(key) for d in DIFFUSERS}
    rates = {d: v for d, v in rates.items() if v}
    return max(rates, key=rates.get) if rates else None


def train_script_main(argv):
    import train  # the repository's train.py, in-process

    return train.main(argv)


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def steady_img_s(log):
    """Median img/s of a run's progress lines after the first (which includes set-up and any compilation)."""
    rates = [r["img_per_s"] for r in log]
    return float(np.median(rates[1:] or rates)) if rates else None


# ------------------------------------------------------------------------------------------- training throughput
def train_speed(ev, system, mode, cfg, flops):
    s, dev = ev.sizes, ev.device
    bf16, compiled = mode != "fp32", mode == "bf16-compile"
    torch.manual_seed(0)
    model = bench.make_model(system, cfg).to(dev)  # .to keeps each parameter's layout
    opt = torch.optim.AdamW(model.parameters(), lr=bench.LR, **(dict(fused=True) if dev.type == "cuda" else
                                                                 dict(foreach=True)))  # as the training loop
    x, t, noise = bench.batch(s.batch, dev, bench.input_format(system))
    step = bench.make_train_step(ev.compile(model) if compiled else model, opt, x, t, noise, bf16, dev)
    seconds, first = timed_with_first(step, s.iters, s.warmup, dev)
    tflops, peak = flops * s.iters / seconds / 1e12, ev.result["peak_tflops"]
    return dict(img_s=s.batch * s.iters / seconds, peak_mem_gib=peak_gib(dev), tflops=tflops,
                mfu=tflops / peak if peak else None, first_calls_s=first)


def loop_speed(ev, flags, name):
    """The real training loop (train.py) on the bundled cats, at the speed sections' preset."""
    run = os.path.join(ev.work, name)
    argv = ["--dataset", "cifar", "--class", "cat", "--data-dir", ev.data_dir, "--preset", ev.sizes.unet,
            "--device", str(ev.device), "--out", run, *ev.sizes.loop_flags, *flags]
    t = time.perf_counter()
    code = train_script_main(argv)
    log = read_log(run)
    return dict(img_s=steady_img_s(log), img_s_lines=[r["img_per_s"] for r in log], wall_s=time.perf_counter() - t,
                exit_code=code, flags=" ".join(flags) or "(defaults: bf16 autocast on CUDA, eager)")


def section_train(ev, res):
    s, dev = ev.sizes, ev.device
    cfg = build_config(s.unet, {}).unet
    systems = ["tinyddpm"] + (list(DIFFUSERS) if ev.diffusers else [])
    res.update(config=s.unet, batch=s.batch, iters=s.iters, warmup=s.warmup, peak_tflops=ev.result["peak_tflops"],
               systems={}, rows={}, loop={})
    for system in systems:
        ev.attempt(res["systems"], system, lambda: dict(
            params=count_parameters(bench.make_model(system, cfg)),
            flops_per_step=bench.count_train_flops(system, cfg, SimpleNamespace(batch_size=s.batch), dev)))
    if not ev.diffusers:
        res["systems"]["diffusers"] = dict(skipped=ev.diffusers_why)

    def row(system, mode):
        flops = res["systems"][system].get("flops_per_step")
        ev.attempt(res["rows"], f"{system}/{mode}", lambda: train_speed(ev, system, mode, cfg, flops),
                   skip=None if flops else "no FLOP count (see systems)")

    for mode in MODES[:2]:
        for system in systems:
            row(system, mode)
    row("tinyddpm", MODES[2])
    if ev.diffusers:  # compiling costs most of a minute: only diffusers' faster layout in bf16
        row(faster_diffusers(res["rows"], "img_s", MODES[1]) or DIFFUSERS[0], MODES[2])
    add_ratios(res["rows"], "img_s")
    ev.attempt(res["loop"], "eager", lambda: loop_speed(ev, (), "loop-eager"))
    ev.attempt(res["loop"], "compile", lambda: loop_speed(ev, ("--compile",), "loop-compile"),
               skip="smoke: inductor on the CPU takes minutes" if ev.args.smoke else
               None if ev.left() > LOOP_COMPILE_MIN_S else f"less than {LOOP_COMPILE_MIN_S} s left in the section")


# ------------------------------------------------------------------------------------------- sampling throughput
def precision(device):
    """The package's sampling precision (tinyddpm.devices.autocast: bf16 on CUDA, fp32 on the CPU), with autocast's
    weight-cast cache off so that a CUDA graph can capture it."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return autocast(device)


def cuda_graph(fn, device):
    """Capture fn() (static inputs) in a CUDA graph after a few eager calls on a side stream; returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode(), precision(device):
        for _ in range(GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode(), precision(device):
        fn()
    return graph.replay


def sample_speed(ev, fn):
    s, dev = ev.sizes, ev.device

    def call():
        with torch.inference_mode(), precision(dev):
            fn()

    seconds, first = timed_with_first(call, s.iters, s.warmup, dev)
    return dict(img_steps_s=s.sample_batch * s.iters / seconds, peak_mem_gib=peak_gib(dev), first_calls_s=first)


def sampler_wall(ev):
    """Our default sampler (sample.py's: DDIM 100 steps, η = 0) on sample_batch images in one batch, with the
    model as sample.py builds it, untrained: the time does not depend on the weights."""
    from tinyddpm.models import build_diffusion, build_unet, no_labels
    from tinyddpm.samplers import sample

    s, dev = ev.sizes, ev.device
    cfg = build_config(s.unet, {})
    model, diffusion = build_unet(cfg, no_labels()).to(dev).eval(), build_diffusion(cfg)
    shape = (3, cfg.data.image_size, cfg.data.image_size)
    for n in (min(2, s.sample_batch), s.sample_batch):  # a tiny run first: cuDNN's and the allocator's warm-up
        bench.sync(dev)
        t = time.perf_counter()
        with autocast(dev):
            x = sample(DEFAULT_SAMPLER, diffusion, model, shape, list(range(n)), dev, steps=s.sampler_steps)
        bench.sync(dev)
    wall = time.perf_counter() - t
    return dict(sampler=DEFAULT_SAMPLER, images=n, steps=s.sampler_steps, wall_s=wall, img_steps_s=n * s.sampler_steps / wall,
                finite=bool(torch.isfinite(x).all()))


def sample_rows(ev, res, system, cfg, variants):
    """Image-steps/s of one system's network at sample_batch, in each of `variants` (SAMPLE_VARIANTS)."""
    dev = ev.device
    xs, ts, _ = bench.batch(ev.sizes.sample_batch, dev, bench.input_format(system), seed=1)
    torch.manual_seed(0)
    model = bench.make_model(system, cfg).to(dev).eval()
    compiled = ev.compile(model, dynamic=False)
    calls = {"eager": lambda: model(xs, ts), "compiled": lambda: compiled(xs, ts)}
    for variant in variants:
        fn = calls["compiled" if variant.startswith("compiled") else "eager"]
        ev.attempt(res["rows"], f"{system}/{variant}",
                   lambda: sample_speed(ev, cuda_graph(fn, dev) if "graph" in variant else fn),
                   skip=None if "graph" not in variant or dev.type == "cuda" else "CUDA graphs need a CUDA device")


def section_sample(ev, res):
    s = ev.sizes
    cfg = build_config(s.unet, {}).unet
    res.update(config=s.unet, batch=s.sample_batch, iters=s.iters, rows={},
               precision="bf16 autocast" if ev.device.type == "cuda" else "fp32")
    sample_rows(ev, res, "tinyddpm", cfg, SAMPLE_VARIANTS)
    ev.attempt(res, "sampler", lambda: sampler_wall(ev))
    if not ev.diffusers:
        res["rows"]["diffusers/eager"] = dict(skipped=ev.diffusers_why)
    else:
        for system in DIFFUSERS:
            sample_rows(ev, res, system, cfg, SAMPLE_VARIANTS[:2])
        best = faster_diffusers(res["rows"], "img_steps_s", "eager") or DIFFUSERS[0]
        sample_rows(ev, res, best, cfg, SAMPLE_VARIANTS[2:])  # compiling: only the faster layout
    add_ratios(res["rows"], "img_steps_s")


# ------------------------------------------------------------------------------------------------ quality run
@contextlib.contextmanager
def sigterm_after(seconds):
    """Send this process SIGTERM after `seconds`, once train.py's own handler is in place (it then saves a checkpoint
    and returns: its documented behaviour under a cluster's time limit). Around it SIGTERM is ignored, so a signal
    that lands early or late cannot kill the rest of the run."""
    def ignore(signum, frame):
        pass

    old, stop = signal.signal(signal.SIGTERM, ignore), threading.Event()

    def fire():
        if stop.wait(max(seconds, 0.0)):
            return
        while signal.getsignal(signal.SIGTERM) is ignore:  # train.py is still starting (or already done)
            if stop.wait(SIGTERM_POLL_S):
                return
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()  # a signal already on its way lands on `ignore`, not on the default handler
        signal.signal(signal.SIGTERM, old)


def report(ev, run, flags, index):
    import sample  # the repository's sample.py, in-process

    out = os.path.join(ev.work, f"report-{index}")
    argv = ["--ckpt", run, "--report", "--out", out, "--device", str(ev.device), "--data-dir", ev.data_dir,
            "--inception-weights", ev.weights, "--cache-dir", os.path.join(ev.work, "fid-cache"),
            *ev.sizes.report_flags, *flags]
    code = sample.main(argv)
    with open(os.path.join(out, "report.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "report.md")) as f:
        table = f.read()
    for png in sorted(f for f in os.listdir(out) if f.endswith(".png"))[:REPORT_PNGS]:  # sample grid, closest pairs
        shutil.copyfile(os.path.join(out, png), os.path.join(ev.args.out, f"quality_{index}_{png}"))
    return dict(flags=" ".join(flags) or "(none: sample.py's defaults)", exit_code=code, summary=summary,
                markdown=table)


def section_quality(ev, res):
    s = ev.sizes
    run = os.path.join(ev.work, "quality")
    budget = ev.left() - s.report_reserve_s
    steps = s.quality_steps or PRESETS[s.quality_preset]["train"]["steps"]  # the clock usually stops it first
    flags = ["--steps", str(steps), "--sample-every", str(steps), "--save-every", str(steps), *s.quality_flags]
    flags += ["--compile"] if ev.args.quality_compile else []
    argv = ["--dataset", "cifar", "--class", "cat", "--data-dir", ev.data_dir, "--preset", s.quality_preset,
            "--device", str(ev.device), "--out", run, *flags]
    res.update(preset=s.quality_preset, train_budget_s=round(budget, 1), train_flags=" ".join(flags), reports=[])
    if budget <= 0:
        raise SectionTimeout("no time left to train")
    ev.say(f"quality: training {s.quality_preset} for at most {budget:.0f} s")
    t = time.perf_counter()
    with sigterm_after(budget):
        code = train_script_main(argv)
    log = read_log(run)
    res.update(train_wall_s=time.perf_counter() - t, train_exit_code=code, img_s=steady_img_s(log),
               steps=log[-1]["step"] if log else None, last_loss=log[-1]["loss"] if log else None)
    ev.save()
    for i, extra in enumerate(s.report_variants):  # sample.py's defaults first, then others while time is left
        if i and ev.left() < REPORT_RETRY_MIN_S:
            break
        rep = ev.attempt(res, "report", lambda: report(ev, run, extra, i))
        res["reports"].append(res.pop("report"))
        if "summary" in rep:
            res["steps"] = rep["summary"].get("step", res["steps"])  # the checkpoint's step, not the last log line
        ev.save()
