"""Train a diffusion model (or a DCGAN) into runs/<name>/; running the same command again resumes.

    python train.py --dataset cifar --class cat
    python train.py --dataset folder --data-dir my_photos/ --image-size 64
    torchrun --nproc_per_node 4 train.py --dataset cifar      # 4 GPUs; --batch-size is the global batch

Ctrl-C or SIGTERM saves a checkpoint and exits (code 128 + signal number); run the same command to resume.
"""
import os
import signal
import sys

from tinyddpm.config import PRESETS, add_config_flags, build_config, default_preset, user_overrides
from tinyddpm.errors import ArgumentParser, UserError, run_cli


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=("ddpm", "dcgan"), default="ddpm", help="diffusion model or DCGAN")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="named configuration (default: tiny on a CPU, small on a GPU)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<classes>-<preset>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (under torchrun: each process its GPU)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) steps whose loss or gradient is NaN/Inf instead of stopping "
                        "(diffusion only; one host sync per step)")
    add_config_flags(p)
    return p


def run_name(cfg):
    classes = "-".join(str(c) for c in cfg.data.classes) or "all"
    data = cfg.data.dataset if cfg.data.dataset != "folder" else os.path.basename(os.path.normpath(cfg.data.data_dir))
    kind = "" if cfg.model == "ddpm" else f"{cfg.model}-"
    cond = "cond-" if cfg.cond.conditional else ""
    return f"{kind}{cond}{data}-{classes}-{cfg.preset}" if cfg.data.dataset == "cifar" else \
        f"{kind}{cond}{data}-{cfg.preset}"


def train_from_args(args, device):
    from tinyddpm import distributed
    from tinyddpm.runs import say
    from tinyddpm.training import train

    overrides = user_overrides(args)
    preset = args.preset
    if preset is None:
        preset = default_preset(device.type)
        say(f"no --preset given: using {preset!r} for the {device.type.upper()} found (see README's presets)")
    cfg = build_config(preset, overrides, model=args.model)
    if cfg.data.dataset == "folder" and "data_dir" not in overrides.get("data", {}):
        raise UserError("--dataset folder needs --data-dir pointing at a folder of images")
    out = args.out or os.path.join("runs", run_name(cfg))
    if cfg.model == "dcgan":
        if args.skip_nonfinite:
            raise UserError("--skip-nonfinite applies to diffusion training only; drop it for --model dcgan")
        if "guide_at" in overrides.get("train", {}):
            raise UserError("--guide-at keeps a snapshot for diffusion sampling only; drop it for --model dcgan")
        if distributed.world_size() > 1:
            raise UserError("--model dcgan trains in one process only; run it with python, not torchrun")
        from tinyddpm.gan_training import train_gan

        return train_gan(cfg, out, device)
    return train(cfg, out, device, skip_nonfinite=args.skip_nonfinite)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from tinyddpm import distributed
    from tinyddpm.devices import resolve_device

    device = distributed.setup(resolve_device(args.device))  # under torchrun: join the group, take this rank's GPU
    try:
        run = train_from_args(args, device)
        # Rank 0 may still be writing the last grid and checkpoint; tearing the group down while another rank is
        # mid-write can abort the process (gloo: "terminate called without an active exception"). On an error
        # there is no barrier, so a failing rank never waits for the others.
        distributed.barrier()
    finally:
        distributed.cleanup()
    stopped = getattr(run, "stopped_by", None)
    # Stopped early by a signal: exit as the shell reports a killed command (128 + n), so `train && sample` stops.
    return 128 + signal.Signals[stopped] if stopped in signal.Signals.__members__ else (1 if stopped else 0)


if __name__ == "__main__":
    from tinyddpm.cpu import configure  # threads follow the free cores (tinyddpm/cpu.py)

    sys.exit(run_cli(main, setup=configure))
