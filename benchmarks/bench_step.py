"""Seconds per CPU training step of train.py configurations, side by side: what a change costs under the budget.

Each configuration is a string of train.py flags. Every repeat times each configuration in turn, as the time budget
does (tinyddpm.training.seconds_per_step: forward, backward, AdamW and EMA on the run's data, after untimed warm-up
steps). Each configuration's figure is its median over the repeats; its cost against the first configuration is the
median over the repeats of the ratio within a repeat, which a machine whose speed drifts between repeats (some do,
by tens of per cent within minutes) changes far less. Run it alone: other jobs on the cores change every figure.

    python benchmarks/bench_step.py "--dataset shapes --conditional --image-size 32" \\
        "--dataset shapes --conditional --image-size 32 --cross-attn-resolutions 32 16" --json runs/bench_step.json
"""
import argparse
import json
import os
import shlex
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/bench_step.py` without installing tinyddpm

import torch  # noqa: E402

import train  # noqa: E402
from tinyddpm.config import build_config, default_preset, user_overrides, validate  # noqa: E402
from tinyddpm.cpu import configure as configure_cpu  # noqa: E402
from tinyddpm.errors import UserError, run_cli  # noqa: E402
from tinyddpm.files import atomic_write_bytes  # noqa: E402
from tinyddpm.models import build_diffusion, build_unet  # noqa: E402
from tinyddpm.runs import load_training_data  # noqa: E402
from tinyddpm.training import make_nets, seconds_per_step  # noqa: E402
from tinyddpm.unet import count_parameters  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="train.py flags, one quoted string per configuration")
    p.add_argument("--repeats", type=int, default=5, help="timings of each configuration (median reported)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def setup(flags, device):
    """(config, nets, diffusion, data) of a diffusion run given by train.py flags; nothing is written."""
    args = train.build_parser().parse_args(shlex.split(flags))
    if args.model != "ddpm":
        raise UserError(f"{flags!r}: only diffusion runs are timed here")
    cfg = validate(build_config(args.preset or default_preset(device.type), user_overrides(args)))
    data = load_training_data(cfg, device)
    torch.manual_seed(cfg.train.seed)
    model = build_unet(cfg, data.label_info).to(device)
    return cfg, make_nets(cfg, model, device), build_diffusion(cfg), data


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise UserError("--repeats must be at least 1")
    device = torch.device("cpu")
    runs = [setup(flags, device) for flags in args.configs]
    times = [[] for _ in runs]
    for r in range(args.repeats):
        for i, (cfg, nets, diffusion, data) in enumerate(runs):
            times[i].append(seconds_per_step(cfg, nets, diffusion, data, device)[0])
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{t[-1]:.4f} s" for t in times), flush=True)
    rows = []
    for flags, (cfg, nets, _, _), t in zip(args.configs, runs, times):
        s, ratio = statistics.median(t), statistics.median(a / b for a, b in zip(t, times[0]))  # paired per repeat
        rows.append(dict(flags=flags, parameters=count_parameters(nets.model), batch=cfg.train.batch_size,
                         seconds_per_step=s, img_per_s=cfg.train.batch_size / s, ratio=ratio, all=t))
        print(f"{s:.4f} s a step ({rows[-1]['img_per_s']:.1f} img/s), {ratio:.3f}× the first (paired), "
              f"{rows[-1]['parameters'] / 1e6:.2f} M parameters: {flags}")
    if args.json:
        info = dict(torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats, rows=rows)
        atomic_write_bytes(args.json, json.dumps(info, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, setup=configure_cpu))
