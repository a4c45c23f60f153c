"""Checkpoints: a plain dict, written atomically, loaded with `weights_only=True`.

    {"format": "tinyddpm", "version": 1, "kind": "ddpm" | "dcgan", "config": RunConfig.to_dict(),
     "labels": {"kind": "none" | "class" | "multilabel", "names": [...]}, "step": int,
     "models": {name: state_dict}, "optimizers": {name: state_dict}, "rng": {...}, "sampler": {...}}

Nothing in it is a Python class, so `torch.load(weights_only=True)` reads it and a crafted file cannot run code.
"""
import os
import pickle

import torch

from .config import RunConfig, validate
from .constants import COND_KINDS, MODEL_KINDS
from .errors import UserError
from .files import atomic_torch_save

FORMAT = "tinyddpm"
FORMAT_VERSION = 1
CKPT_NAME = "ckpt.pt"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"  # the PROTO opcode that starts every pickle of protocol ≥ 2


def nonfinite_tensor(state):
    """The name of the first floating-point tensor of a state dict that holds NaN or inf, or None."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def save_checkpoint(path, state: dict):
    """Add the format header and write atomically (temp file + os.replace)."""
    atomic_torch_save({"format": FORMAT, "version": FORMAT_VERSION, **state}, path)


def _looks_like_torch_file(path):
    """torch.save writes a zip archive (older PyTorch: a pickle, protocol 2+); anything else is not a checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path}: {e.strerror}; check the path and its permissions") from None
    return head == ZIP_MAGIC or head[:1] == PICKLE_PROTO


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read and validate a checkpoint; every way it can be wrong is one UserError line."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, CKPT_NAME)):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; pass the ckpt.pt of a training run (runs/<name>/ckpt.pt)")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder without {CKPT_NAME}; pass the checkpoint file")
    if not os.path.isfile(path):  # a FIFO or a device would block the read, or never end
        raise UserError(f"{path} is not a regular file (a pipe or a device?); pass the ckpt.pt of a training run")
    if not _looks_like_torch_file(path):
        raise UserError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch file; "
                        "use a complete ckpt.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know: a crafted file that would run code lands here.
        first = str(e).strip().splitlines()[-1][:160] if str(e).strip() else ""
        raise UserError(f"refused to load {path}: it holds Python objects that safe loading does not allow "
                        f"({first}); only load checkpoints you trust, and only tinyddpm's plain-dict format") from None
    except Exception as e:  # a damaged file can fail anywhere in unzipping/unpickling (EOFError, IndexError, …)
        raise UserError(f"cannot read checkpoint {path}: it is truncated or not a PyTorch file "
                        f"({e.__class__.__name__}); use a complete ckpt.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a tinyddpm checkpoint; pass a ckpt.pt written by train.py")
    version = ckpt.get("version")
    if not isinstance(version, int):
        raise UserError(f"{path} has no valid format version ({version!r}); the file is damaged or was edited")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format version {version}, newer than this tinyddpm "
                        f"(reads ≤ {FORMAT_VERSION}); upgrade tinyddpm")
    if ckpt.get("kind") not in MODEL_KINDS:
        raise UserError(f"{path} holds a model of kind {ckpt.get('kind')!r}; this tinyddpm knows {MODEL_KINDS}")
    try:
        ckpt["run_config"] = RunConfig.from_dict(ckpt["config"])
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{path} has no readable config ({e.__class__.__name__}); the file is damaged or was edited") \
            from None
    validate(ckpt["run_config"], where=path)  # the same checks as the command line, before anything is built
    labels, step = ckpt.get("labels"), ckpt.get("step")
    names = labels.get("names") if isinstance(labels, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)
            and labels.get("kind") in COND_KINDS and (labels["kind"] == "none") == (not names)):
        raise UserError(f"{path} has no valid label description ({str(labels)[:80]}); the file is damaged or was "
                        "edited")
    if not isinstance(step, int) or step < 0 or not isinstance(ckpt.get("models"), dict):
        raise UserError(f"{path} has no valid step or weights; the file is damaged or was edited")
    return ckpt
