"""Explicit device and precision: bf16 autocast on CUDA with fp32 master weights, plain fp32 on the CPU."""
import contextlib
import re

import torch

from .errors import UserError


def resolve_device(name="auto"):
    """--device → torch.device. 'auto' is the GPU when there is one, else the CPU; otherwise cpu, cuda or cuda:N.

    tinyddpm runs on CPUs and CUDA GPUs only: torch also knows mps, xla, meta and more, but the code is not tested
    there (meta has no data at all), so those are a user error here rather than a traceback later."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(name)  # a torch.device too
    if name in ("cpu", "cpu:0"):
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    if cuda is None:
        what = (f"device {name!r} is not supported (tinyddpm runs on CPUs and CUDA GPUs)" if _torch_knows(name)
                else f"unknown device {name!r}")
        raise UserError(f"{what}; use --device auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    index, count = int(cuda.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise UserError(f"--device {name} asked for, but only {count} CUDA GPU(s) are visible "
                        f"(cuda:0 … cuda:{count - 1})")
    return torch.device(name)


def _torch_knows(name):
    try:
        torch.device(name)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
