"""Training and sampling speed of tinyddpm's U-Net against diffusers' UNet2DModel, in one run on one device.

Both networks are built at the same configuration (`--config ddpm-cifar`: Ho et al.'s CIFAR-10 model, 35.7 M
parameters each; `--config tiny`: the CPU preset, 0.76 M each) and trained on the same synthetic batch (x_t, t, noise
all random: data loading is not measured): forward, MSE against the noise, backward, AdamW step. Per mode (fp32,
fp32 + torch.compile, bf16 autocast, bf16 autocast + torch.compile) it reports training img/s, peak memory (CUDA),
achieved TFLOP/s and MFU (FLOPs of one training step counted with torch.utils.flop_counter.FlopCounterMode, divided
by --peak-tflops), and
sampling speed: model forwards on --sample-batch images (default: the report's batch, sample.py --batch-size) under
inference_mode, in image-steps/s (one image through one denoising step).

Layouts: tinyddpm's U-Net keeps its weights in channels_last (tinyddpm/unet.py) and takes the NCHW batch. diffusers
runs twice: as shipped (NCHW, row `diffusers`) and converted to channels_last with a channels_last batch (row
`diffusers-cl`); the ratios are against the faster of the two. Every measurement is repeated --repeats times,
alternating the systems, and the median is reported. The process runs under tinyddpm's CPU policy
(tinyddpm/cpu.py, as train.py does): the same threads and allocator settings for every system.

    python benchmarks/bench_unet.py --config tiny --device cpu --json runs/bench_unet_cpu.json   # the CPU goal
    python benchmarks/bench_unet.py --device cuda --json runs/bench_unet.json
    python benchmarks/bench_unet.py --config tiny --device cpu --iters 2 --warmup 1 --sample-batch 4 --repeats 1

diffusers is imported only if installed; without it only tinyddpm is measured (and the output says so).

GPU recipe (an offline GPU machine; diffusers is a benchmark-only dependency, never a tinyddpm one):
  1. On a machine that can reach PyPI, fetch wheels for the GPU machine's Python into the git-ignored .whl/ folder:
         pip download diffusers -d .whl --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64
     (27 wheels, 39 MB with diffusers 0.42.1: huggingface_hub, safetensors, regex, numpy, pillow, …; torch is
     not among them, the GPU machine's own CUDA torch is used; match --python-version to the GPU machine's).
  2. Bring .whl/ along with the repo (e.g. carry=[".whl"]), then on the GPU machine:
         python -m pip install --no-index --find-links .whl diffusers
         python benchmarks/bench_unet.py --device cuda --json "$OUT/bench_unet.json"
     (Not yet run on a GPU: this script was only smoke-tested on CPU.)
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
# CPU (docs/speed.md: 0.84× eager for training there); bf16 modes are for a GPU. --modes tries any of them.
CPU_MODES = ("fp32",)
GPU_MODES = ("fp32", "bf16", "bf16-compile")  # the GPU evidence's modes (benchmarks/gpu_sections.py)
SYSTEMS = ("tinyddpm", "diffusers", "diffusers-cl")
REPORT_SAMPLE_BATCH = 256  # sample.py --batch-size: the batch `sample.py --report` generates with
CONFIGS = ("ddpm-cifar", "tiny")
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM, dense bf16 tensor-core peak
IMAGE_SIZE = 32  # CIFAR-10
TIMESTEPS = 1000
LR = 2e-4  # Ho et al.; the value does not change the speed
GIB = 2 ** 30


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu, …")
    p.add_argument("--config", default="ddpm-cifar", choices=CONFIGS, help="U-Net preset for both systems")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--sample-batch", type=int, default=REPORT_SAMPLE_BATCH, help="batch for the sampling forwards")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (includes compilation)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per system and mode (median reported)")
    p.add_argument("--modes", nargs="+", choices=MODES,
                   help=f"precision / compilation modes (default: {' '.join(GPU_MODES)} on CUDA, {' '.join(CPU_MODES)} "
                   "on a CPU)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="the device's peak TFLOP/s for MFU (default: H100 bf16 dense)")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    return p


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
    except ImportError:
        return None
    return diffusers.__version__


def make_model(system, cfg):
    if system == "tinyddpm":
        return UNet(cfg, IMAGE_SIZE)  # channels_last weights of its own
    model = DiffusersUNet(cfg, IMAGE_SIZE)
    return model.to(memory_format=torch.channels_last) if system == "diffusers-cl" else model


def input_format(system):
    """The batch's layout: NCHW as data arrives, except for the channels_last diffusers row."""
    return torch.channels_last if system == "diffusers-cl" else torch.contiguous_format


# ------------------------------------------------------------------------------------------------- measurements

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters, warmup, device):
    """Seconds for `iters` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return time.perf_counter() - start


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
    bf16, compile_ = mode.startswith("bf16"), mode.endswith("-compile")
    memory_format = input_format(system)
    torch.manual_seed(0)
    model = make_model(system, cfg).to(device)  # .to keeps each parameter's layout
    # The training loop's optimizer: fused on CUDA, foreach on a CPU (tinyddpm/training.py).
    opt = torch.optim.AdamW(model.parameters(), lr=LR, **(dict(fused=True) if device.type == "cuda" else
                                                           dict(foreach=True)))
    run = torch.compile(model) if compile_ else model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    x, t, noise = batch(args.batch_size, device, memory_format)
    seconds = timed(make_train_step(run, opt, x, t, noise, bf16, device), args.iters, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    train_img_s = args.batch_size * args.iters / seconds
    tflops = flops_per_step * args.iters / seconds / 1e12
    del opt, x, t, noise

    # Sampling: one denoising step of the whole batch per call (a separate compiled graph: no autograd, new batch).
    model.eval()
    run = torch.compile(model, dynamic=False) if compile_ else model
    xs, ts, _ = batch(args.sample_batch, device, memory_format, seed=1)

    def sample_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            run(xs, ts)

    sample_s = timed(sample_step, args.iters, args.warmup, device)
    return dict(system=system, mode=mode, train_img_s=train_img_s, peak_mem_gib=peak, train_tflops=tflops,
                mfu=tflops / args.peak_tflops, sample_img_steps_s=args.sample_batch * args.iters / sample_s)


# ---------------------------------------------------------------------------------------------------- reporting

def fmt(v, spec, suffix=""):
    return "n/a" if v is None else format(v, spec) + suffix


def table(rows):
    head = ("| system | mode | train img/s | peak mem (GiB) | TFLOP/s | MFU | train vs diffusers "
            "| sample img-steps/s | sample vs diffusers |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['mode']} | failed: {r['error']} |" + " |" * 6)
            continue
        lines.append(f"| {r['system']} | {r['mode']} | {r['train_img_s']:.1f} | {fmt(r['peak_mem_gib'], '.2f')} "
                     f"| {r['train_tflops']:.2f} | {r['mfu']:.1%} | {fmt(r['train_vs_diffusers'], '.2f', '×')} "
                     f"| {r['sample_img_steps_s']:.0f} | {fmt(r['sample_vs_diffusers'], '.2f', '×')} |")
    return "\n".join(lines)


def median_rows(runs):
    """One row per (system, mode): the median of each figure over the repeats (a failure in any repeat is kept)."""
    rows = []
    for key in dict.fromkeys((r["system"], r["mode"]) for r in runs):
        mine = [r for r in runs if (r["system"], r["mode"]) == key]
        failed = [r for r in mine if "error" in r]
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
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        peers = [d for d in ok if d["system"].startswith("diffusers") and d["mode"] == r["mode"]]
        for figure, ratio in (("train_img_s", "train_vs_diffusers"), ("sample_img_steps_s", "sample_vs_diffusers")):
            r[ratio] = r[figure] / max(d[figure] for d in peers) if peers else None


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "sample_batch", "iters", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.peak_tflops <= 0:
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
    print(f"# U-Net benchmark: {args.config}, {device_name}, torch {torch.__version__}, diffusers {version}, "
          f"batch {args.batch_size}, sample batch {args.sample_batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; MFU against {args.peak_tflops:g} TFLOP/s (also for the fp32 rows)")
    params, flops, runs = {}, {}, []
    for system in systems[:2]:  # diffusers-cl is the same network as diffusers
        params[system] = count_parameters(make_model(system, cfg))
        flops[system] = count_train_flops(system, cfg, args, device)
        print(f"{system}: {params[system] / 1e6:.2f} M parameters, "
              f"{flops[system] / args.batch_size / 1e9:.2f} GFLOP per training image", flush=True)
    for _ in range(args.repeats):
        for mode in modes:
            for system in systems:  # alternating: a slow phase of the machine hits every system alike
                try:
                    runs.append(measure(system, mode, cfg, args, device, flops[system.removesuffix("-cl")]))
                except Exception as e:  # one failing mode (e.g. compile, out of memory) must not lose the others
                    runs.append(dict(system=system, mode=mode, error=f"{type(e).__name__}: {e}".splitlines()[0]))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    rows = median_rows(runs)
    add_ratios(rows)
    for note in notes:
        print(f"note: {note}")
    print(table(rows))

    if args.json:
        result = dict(config=args.config, device=device_name, torch=torch.__version__, diffusers=version,
                      batch_size=args.batch_size, sample_batch=args.sample_batch, iters=args.iters,
                      warmup=args.warmup, repeats=args.repeats, threads=torch.get_num_threads(),
                      peak_tflops=args.peak_tflops,
                      tf32=dict(cudnn=torch.backends.cudnn.allow_tf32, matmul=torch.backends.cuda.matmul.allow_tf32),
                      params=params, train_flops_per_step=flops, notes=notes, results=rows)
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, setup=configure_cpu))
