"""Explicit device and precision: bf16 autocast on CUDA with fp32 master weights, plain fp32 on the CPU."""
import contextlib

import torch

from .errors import UserError


def resolve_device(name="auto"):
    """'auto' → the GPU when there is one, else the CPU; a CUDA request without a GPU is a user error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
