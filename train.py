"""Train a diffusion model (or a DCGAN) into runs/<name>/; running the same command again resumes.

    python train.py --dataset cifar --class cat
    python train.py --dataset folder --data-dir my_photos/ --image-size 64
"""
import argparse
import os
import sys

from tinyddpm.config import PRESETS, add_config_flags, build_config, default_preset, user_overrides
from tinyddpm.errors import UserError, run_cli


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("ddpm", "dcgan"), default="ddpm", help="diffusion model or DCGAN")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="named configuration (default: tiny on a CPU, small on a GPU)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<classes>-<preset>)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    add_config_flags(p)
    return p


def run_name(cfg):
    classes = "-".join(str(c) for c in cfg.data.classes) or "all"
    data = cfg.data.dataset if cfg.data.dataset != "folder" else os.path.basename(os.path.normpath(cfg.data.data_dir))
    kind = "" if cfg.model == "ddpm" else f"{cfg.model}-"
    cond = "cond-" if cfg.cond.conditional else ""
    return f"{kind}{cond}{data}-{classes}-{cfg.preset}" if cfg.data.dataset == "cifar" else \
        f"{kind}{cond}{data}-{cfg.preset}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    from tinyddpm.devices import resolve_device
    from tinyddpm.training import say, train

    device = resolve_device(args.device)
    overrides = user_overrides(args)
    preset = args.preset
    if preset is None:
        preset = default_preset(device.type)
        say(f"no --preset given: using {preset!r} for the {device.type.upper()} found (see README's presets)")
    cfg = build_config(preset, overrides, model=args.model)
    if cfg.data.dataset == "folder" and "data_dir" not in overrides.get("data", {}):
        raise UserError("--dataset folder needs --data-dir pointing at a folder of images")
    if cfg.model == "dcgan":
        from tinyddpm.gan_training import train_gan

        train_gan(cfg, args.out or os.path.join("runs", run_name(cfg)), device)
    else:
        train(cfg, args.out or os.path.join("runs", run_name(cfg)), device)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
