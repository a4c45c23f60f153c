"""Training and sampling speed of tinyddpm's U-Net against diffusers' UNet2DModel, in one run on one device.

Both networks at one configuration (`--config ddpm-cifar`: Ho et al.'s CIFAR-10 model, 35.7 M parameters each;
`tiny`: the CPU preset, 0.76 M) train on one synthetic batch (data loading is not measured): forward, MSE, backward,
AdamW. Per mode (fp32 or bf16 autocast, each eager or torch.compile): training img/s, peak memory (CUDA), TFLOP/s
and MFU (FLOPs counted by torch.utils.flop_counter, over --peak-tflops), the seconds of the untimed first calls
(compilation included), and sampling forwards of --sample-batch images in image-steps/s, on CUDA also replayed as
one CUDA graph. tinyddpm keeps its weights channels_last and takes NCHW batches; diffusers runs as shipped
(`diffusers`) and in channels_last (`diffusers-cl`): ratios are against the faster of the two, and a compiled mode
compiles only the layout that trained faster uncompiled. Each figure is the median of --repeats, the systems
alternating, under tinyddpm's CPU policy (tinyddpm/cpu.py) as train.py runs; diffusers is measured where installed.

    python benchmarks/bench_unet.py --config tiny --device cpu --json runs/bench_unet_cpu.json   # the CPU goal
    python benchmarks/bench_unet.py --device cuda --sample-batch 1000 --json runs/bench_unet.json  # docs/gpu.md
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/bench_unet.py` without installing tinyddpm

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tinyddpm.config import build_config  # noqa: E402
from tinyddpm.errors import UserError, run_cli  # noqa: E402
from tinyddpm.files import atomic_write_bytes  # noqa: E402
from tinyddpm.cpu import configure as configure_cpu  # noqa: E402
from tinyddpm.unet import UNet, count_parameters, norm_groups  # noqa: E402

MODES = ("fp32", "fp32-compile", "bf16", "bf16-compile")
# The CPU goal is fp32 eager, the training loop's CPU default. fp32-compile is the training loop's --compile on a
# CPU (docs/speed.md); bf16 modes are for a GPU. --modes tries any of them.
CPU_MODES = ("fp32",)
GPU_MODES = ("fp32", "bf16", "bf16-compile")
SYSTEMS = ("tinyddpm", "diffusers", "diffusers-cl")
REPORT_SAMPLE_BATCH = 256  # sample.py --batch-size: the batch `sample.py --report` generates with
CONFIGS = ("ddpm-cifar", "tiny")
# Dense bf16 tensor-core peaks from NVIDIA's datasheets by device name, first match wins (H200 SXM = H100 SXM).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))
IMAGE_SIZE = 32  # CIFAR-10
TIMESTEPS = 1000
LR = 2e-4  # Ho et al.; the value does not change the speed
GIB = 2 ** 30
GRAPH_WARMUP = 3  # eager calls on a side stream before a CUDA graph capture (cuDNN and cuBLAS pick their kernels)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu, …")
    p.add_argument("--config", default="ddpm-cifar", choices=CONFIGS, help="U-Net preset for both systems")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch", type=int, default=REPORT_SAMPLE_BATCH, help="batch for the sampling forwards")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (includes compilation)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per system and mode (median reported)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="precision / compilation modes (default: "
                   f"{' '.join(GPU_MODES)} on CUDA, {' '.join(CPU_MODES)} on a CPU)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: by GPU name, H100/H200 dense bf16; none on a CPU)")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file (after each row)")
    return p


def peak_tflops(device_name):
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


# ----------------------------------------------------------------------------------------------- the two systems

class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel at a tinyddpm UNetConfig, called like ours: (x, t) → tensor."""

    def __init__(self, cfg, image_size):
        super().__init__()
        from diffusers import UNet2DModel

        widths = tuple(cfg.base_channels * m for m in cfg.channel_mults)
        sizes = [image_size // 2 ** i for i in range(len(widths))]
        attn = [s in cfg.attn_resolutions for s in sizes]
        self.net = UNet2DModel(
            sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=widths,
            # One GroupNorm group count for every width: our first level's (same parameters whatever the count).
            layers_per_block=cfg.num_res_blocks, dropout=cfg.dropout, norm_num_groups=norm_groups(widths[0]),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=None if cfg.num_heads == 1 else widths[-1] // cfg.num_heads,
            resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default")

    def forward(self, x, t):
        return self.net(x, t).sample


def diffusers_version():
    try:
        import diffusers
        return diffusers.__version__
    except Exception:  # ImportError, or a version clash inside diffusers' own imports
        return None


def make_model(system, cfg):
    if system == "tinyddpm":
        return UNet(cfg, IMAGE_SIZE)  # channels_last weights of its own
    model = DiffusersUNet(cfg, IMAGE_SIZE)
    return model.to(memory_format=torch.channels_last) if system == "diffusers-cl" else model


def input_format(system):
    """The batch's layout: NCHW as data arrives, except for the channels_last diffusers row."""
    return torch.channels_last if system == "diffusers-cl" else torch.contiguous_format


# ------------------------------------------------------------------------------------------------- measurements

def timed(fn, iters, warmup, device):
    """(seconds for `iters` calls of fn, seconds of the `warmup` untimed calls before them)."""
    seconds = []
    for n in (warmup, iters):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[1], seconds[0]


def batch(n, device, memory_format, seed=0):
    """A synthetic noisy batch: x_t [n, 3, 32, 32], t [n], noise [n, 3, 32, 32]."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g, device=device).contiguous(memory_format=memory_format)
    t = torch.randint(0, TIMESTEPS, (n,), generator=g, device=device)
    return x, t, torch.randn(x.shape, generator=g, device=device)


def make_train_step(model, opt, x, t, noise, bf16, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(model(x, t).float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def cuda_graph(fn, device):
    """fn() on static inputs captured as one CUDA graph, after a few calls on a side stream; returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def count_train_flops(system, cfg, args, device):
    """FLOPs of one eager training step (forward + backward; the optimizer's elementwise work is not counted)."""
    torch.manual_seed(0)
    model = make_model(system, cfg).to(device)
    x, t, noise = batch(args.batch_size, device, input_format(system))
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(x, t), noise).backward()
    return counter.get_total_flops()


def measure(system, mode, cfg, args, device, flops_per_step):
    """Training and sampling speed of one system in one mode: a dict of figures."""
    bf16, compiled = mode.startswith("bf16"), mode.endswith("-compile")
    memory_format = input_format(system)
    torch.manual_seed(0)
    model = make_model(system, cfg).to(device)  # .to keeps each parameter's layout
    # The training loop's optimizer: fused on CUDA, foreach on a CPU (tinyddpm/training.py).
    opt = torch.optim.AdamW(model.parameters(), lr=LR, **(dict(fused=True) if device.type == "cuda" else
                                                           dict(foreach=True)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    x, t, noise = batch(args.batch_size, device, memory_format)
    step = make_train_step(torch.compile(model) if compiled else model, opt, x, t, noise, bf16, device)
    seconds, first = timed(step, args.iters, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    tflops = flops_per_step * args.iters / seconds / 1e12
    del opt, x, t, noise, step

    # Sampling: one denoising step of the whole batch per call (a separate compiled graph: no autograd, new batch).
    # Autocast's weight-cast cache is off, so that a CUDA graph can capture the call; a forward uses each weight once.
    model.eval()
    run = torch.compile(model, dynamic=False) if compiled else model
    xs, ts, _ = batch(args.sample_batch, device, memory_format, seed=1)

    def sample_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16,
                                                    cache_enabled=False):
            run(xs, ts)

    sample_s, sample_first = timed(sample_step, args.iters, args.warmup, device)
    row = dict(system=system, mode=mode, train_img_s=args.batch_size * args.iters / seconds, peak_mem_gib=peak,
               train_tflops=tflops, mfu=tflops / args.peak_tflops if args.peak_tflops else None,
               sample_img_steps_s=args.sample_batch * args.iters / sample_s, first_calls_s=first + sample_first)
    try:  # a capture that fails loses only this figure
        if device.type == "cuda":
            graph_s, _ = timed(cuda_graph(sample_step, device), args.iters, args.warmup, device)
            row["sample_graph_img_steps_s"] = args.sample_batch * args.iters / graph_s
    except Exception as e:
        row["sample_graph_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    return row


def not_compiled(runs, system, mode):
    """Why (system, mode) is skipped, or None: a compiled mode compiles only the diffusers layout that trained faster
    in the same mode uncompiled, where both were measured."""
    eager = mode.removesuffix("-compile")
    if eager == mode or not system.startswith("diffusers"):
        return None
    rates = {r["system"]: r["train_img_s"] for r in median_rows(runs)
             if r["mode"] == eager and r["system"].startswith("diffusers") and "train_img_s" in r}
    if len(rates) == 2 and rates[system] < max(rates.values()):
        return f"the other diffusers layout trained faster in {eager}; only that one is compiled"
    return None


# ---------------------------------------------------------------------------------------------------- reporting

def fmt(v, spec, suffix=""):
    return "n/a" if v is None else format(v, spec) + suffix


def best_sample(r):
    """A row's sampling image-steps/s: the faster of eager and (on CUDA) its CUDA graph."""
    return max(r["sample_img_steps_s"], r.get("sample_graph_img_steps_s") or 0)


def table(rows):
    head = ("| system | mode | train img/s | peak mem (GiB) | TFLOP/s | MFU | train vs diffusers "
            "| sample img-steps/s | CUDA graph | sample vs diffusers | first calls (s) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "train_img_s" not in r:
            why = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['system']} | {r['mode']} | {why} |" + " |" * 8)
            continue
        lines.append(f"| {r['system']} | {r['mode']} | {r['train_img_s']:.1f} | {fmt(r['peak_mem_gib'], '.2f')} "
                     f"| {r['train_tflops']:.2f} | {fmt(r['mfu'], '.1%')} "
                     f"| {fmt(r['train_vs_diffusers'], '.2f', '×')} "
                     f"| {r['sample_img_steps_s']:.0f} | {fmt(r.get('sample_graph_img_steps_s'), '.0f')} "
                     f"| {fmt(r['sample_vs_diffusers'], '.2f', '×')} | {r['first_calls_s']:.1f} |")
    return "\n".join(lines)


def median_rows(runs):
    """One row per (system, mode): the median of each figure over the repeats (a failure in any repeat is kept)."""
    rows = []
    for key in dict.fromkeys((r["system"], r["mode"]) for r in runs):
        mine = [r for r in runs if (r["system"], r["mode"]) == key]
        failed = [r for r in mine if "train_img_s" not in r]
        if failed:
            rows.append(failed[0])
            continue
        row = dict(mine[0])
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = statistics.median(r[k] for r in mine)
        row["repeats"] = len(mine)
        rows.append(row)
    return rows


def add_ratios(rows):
    """tinyddpm / the faster diffusers layout in the same mode, per figure (None where diffusers did not run)."""
    ok = [r for r in rows if "train_img_s" in r]
    for r in ok:
        peers = [d for d in ok if d["system"].startswith("diffusers") and d["mode"] == r["mode"]]
        r["train_vs_diffusers"] = r["train_img_s"] / max(d["train_img_s"] for d in peers) if peers else None
        r["sample_vs_diffusers"] = best_sample(r) / max(map(best_sample, peers)) if peers else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "sample_batch", "iters", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        raise UserError("--warmup must be ≥ 0 and --peak-tflops > 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a torch device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but this torch sees no CUDA GPU; pass --device cpu")
    if args.json and os.path.isdir(args.json):
        raise UserError(f"--json {args.json} is a folder; pass a file path such as {args.json}/bench_unet.json")
    modes = args.modes or list(GPU_MODES if device.type == "cuda" else CPU_MODES)
    cfg = build_config(args.config, {}).unet

    version = diffusers_version()
    systems = list(SYSTEMS if version else SYSTEMS[:1])
    notes = [] if version else ["diffusers is not installed: only tinyddpm was measured (no ratios)"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.peak_tflops = args.peak_tflops or peak_tflops(device_name)
    print(f"# U-Net benchmark: {args.config}, {device_name}, torch {torch.__version__}, diffusers {version}, "
          f"batch {args.batch_size}, sample batch {args.sample_batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; " + (f"MFU against {args.peak_tflops:g} TFLOP/s (also for the fp32 rows)"
                                           if args.peak_tflops else "no MFU (no peak known; --peak-tflops)"))
    params, flops, runs, skip = {}, {}, [], {}
    for system in systems[:2]:  # diffusers-cl is the same network as diffusers
        params[system] = count_parameters(make_model(system, cfg))
        flops[system] = count_train_flops(system, cfg, args, device)
        print(f"{system}: {params[system] / 1e6:.2f} M parameters, "
              f"{flops[system] / args.batch_size / 1e9:.2f} GFLOP per training image", flush=True)

    settings = dict(vars(args), device_name=device_name, torch=torch.__version__, diffusers=version, notes=notes,
                    threads=torch.get_num_threads(), params=params, train_flops_per_step=flops,
                    tf32=dict(cudnn=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32))

    def save():
        rows = median_rows(runs)
        add_ratios(rows)
        if args.json:
            atomic_write_bytes(args.json, (json.dumps(dict(settings, results=rows), indent=2) + "\n").encode())
        return rows

    for _ in range(args.repeats):
        for mode in modes:
            for system in systems:  # alternating: a slow phase of the machine hits every system alike
                if (system, mode) not in skip:  # decided once, at the first repeat
                    skip[system, mode] = not_compiled(runs, system, mode)
                try:
                    runs.append(dict(system=system, mode=mode, skipped=skip[system, mode]) if skip[system, mode]
                                else measure(system, mode, cfg, args, device, flops[system.removesuffix("-cl")]))
                except Exception as e:  # one failing mode (e.g. compile, out of memory) must not lose the others
                    runs.append(dict(system=system, mode=mode, error=f"{type(e).__name__}: {e}".splitlines()[0]))
                save()
    rows = save()
    for note in notes:
        print(f"note: {note}")
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, setup=configure_cpu))
