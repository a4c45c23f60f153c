"""The shapes evaluator: a small CNN that names the objects in a scene, to score a conditional generator.

Like i-CLEVR's evaluator (a classifier trained on real scenes), it is trained on rendered shapes scenes with a
binary cross-entropy per label, and a generated image for label set y is scored the i-CLEVR way: with k objects
in y, take the evaluator's k highest-scoring labels; accuracy is the fraction of those that are in y, averaged
over all objects of all images (`iclevr_accuracy`). Trained on train-split scenes, it is measured on scenes of
test-split label sets (combinations it never saw), which is where a conditional generator is evaluated too.

    python -m tinyddpm.evaluator --out runs/evaluator.pt [--size 64] [--steps N]

trains one (minutes on a CPU) and prints its held-out accuracy. The checkpoint is a plain dict (config as plain
data + state_dict), written atomically and read with torch.load(weights_only=True).
"""
import dataclasses
import math
import os
import pickle
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import shapes
from .devices import resolve_device
from .errors import ArgumentParser, UserError, run_cli
from .files import atomic_torch_save

FORMAT = "tinyddpm"  # the same header as training checkpoints, with its own kind
FORMAT_VERSION = 1
KIND = "shapes-evaluator"
STEM_MAP = 32  # the first convolution strides larger images down to this many pixels across (CPU cost)
FINAL_MAP = 8  # then stages halve the map until it is this many pixels across
BASE_CHANNELS = 16  # channels after the stem; doubled at each halving up to MAX_CHANNELS
MAX_CHANNELS = 64
HELDOUT_SEED = 1_000_003  # scenes for the held-out figure: a seed training never uses
EVAL_BATCH = 256  # images per forward pass when scoring


# ------------------------------------------------------------------------------------------------ model
def _conv_bn_relu(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Evaluator(nn.Module):
    """Multi-label CNN: [B, 3, size, size] in [-1, 1] → logits [B, 24] (one per VOCAB entry).

    A conv stem (stride 2 at 64 px, so both sizes cost about the same), then (stride-2 conv, conv) stages until the
    map is FINAL_MAP pixels across, then global max and mean pooling (max: "is this object anywhere?"; mean: how
    much of it) and one linear layer.
    """

    def __init__(self, size=64, base_channels=BASE_CHANNELS, max_channels=MAX_CHANNELS,
                 num_labels=shapes.NUM_LABELS):
        super().__init__()
        if size < FINAL_MAP or size & (size - 1):
            raise UserError(f"evaluator image size {size} must be a power of two ≥ {FINAL_MAP}; use 32 or 64")
        stem_stride = max(1, size // STEM_MAP)
        self.config = dict(size=size, base_channels=base_channels, max_channels=max_channels,
                           num_labels=num_labels, vocab=list(shapes.VOCAB))
        layers, c = [_conv_bn_relu(3, base_channels, stem_stride)], base_channels
        for _ in range(int(math.log2(size // stem_stride // FINAL_MAP))):
            c_out = min(2 * c, max_channels)
            layers += [_conv_bn_relu(c, c_out, 2), _conv_bn_relu(c_out, c_out, 1)]
            c = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c, num_labels)

    def forward(self, x):
        h = self.features(x)  # [B, C, FINAL_MAP, FINAL_MAP]
        return self.head(torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1))


# ------------------------------------------------------------------------------------------------ scoring
def iclevr_accuracy(logits, multi_hot) -> float:
    """i-CLEVR accuracy: per image with k true objects, the share of the k top-scoring labels that are true;
    summed over images and divided by the total number of objects. logits, multi_hot: [N, 24]."""
    logits, multi_hot = torch.as_tensor(logits).float(), torch.as_tensor(multi_hot).float()
    if logits.shape != multi_hot.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(multi_hot.shape)} must both be [N, L]")
    k = (multi_hot > 0.5).sum(dim=1)
    if int(k.sum()) == 0:
        raise ValueError("no objects in the labels: accuracy is undefined")
    # Rank labels by score; the top-k of row i are those with rank < k_i (ties broken by position, as topk does).
    order = logits.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(logits.shape[1]).expand_as(order))
    hits = ((ranks < k[:, None]) & (multi_hot > 0.5)).sum()
    return float(hits) / float(k.sum())


def _to_model_input(images, size):
    """uint8 [N, H, W, 3] (numpy or torch, as saved) or float [N, 3, H, W] in [-1, 1] → float [N, 3, H, W]."""
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise UserError(f"uint8 images must be [N, H, W, 3], got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    elif x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"float images must be [N, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
    if x.shape[2] != size or x.shape[3] != size:
        raise UserError(f"images are {x.shape[3]}×{x.shape[2]} but the evaluator was trained at {size}×{size}; "
                        f"train one with `python -m tinyddpm.evaluator --size {x.shape[2]}`")
    return x.float()


@torch.no_grad()
def predict(evaluator, images, batch_size=EVAL_BATCH):
    """Logits float [N, 24] (on the CPU) for uint8 [N, H, W, 3] or float [N, 3, H, W] images in [-1, 1]."""
    x = _to_model_input(images, evaluator.config["size"])
    device = next(evaluator.parameters()).device
    was_training = evaluator.training
    evaluator.eval()
    try:
        return torch.cat([evaluator(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, x.shape[0], batch_size)])
    finally:
        evaluator.train(was_training)


def evaluate_images(evaluator, images, multi_hot) -> float:
    """i-CLEVR accuracy of images (uint8 [N, H, W, 3] or float [N, 3, H, W] in [-1, 1]) for multi-hot [N, 24]."""
    return iclevr_accuracy(predict(evaluator, images), multi_hot)


# ------------------------------------------------------------------------------------------------ checkpoint
def save_evaluator(evaluator, path, metrics=None):
    """Plain dict (header, config, state_dict, metrics), written atomically."""
    atomic_torch_save({"format": FORMAT, "version": FORMAT_VERSION, "kind": KIND, "config": dict(evaluator.config),
                       "state_dict": {k: v.detach().cpu() for k, v in evaluator.state_dict().items()},
                       "metrics": dict(metrics or {})}, path)


def load_evaluator(path, map_location="cpu") -> Evaluator:
    """Read an evaluator checkpoint (weights_only=True); every way it can be wrong is one UserError line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise UserError(f"evaluator {path} {what}; train one with `python -m tinyddpm.evaluator --out {path}`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"refused to load {path}: it is not a PyTorch zip file, or it holds Python objects that safe "
                        f"loading does not allow; only load evaluators written by tinyddpm") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"cannot read evaluator {path}: truncated or not a PyTorch file ({e.__class__.__name__}); "
                        f"train a new one with `python -m tinyddpm.evaluator --out {path}`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("kind") != KIND:
        raise UserError(f"{path} is not a tinyddpm shapes evaluator; train one with `python -m tinyddpm.evaluator`")
    config = ckpt["config"]
    if list(config.get("vocab", [])) != list(shapes.VOCAB):
        raise UserError(f"{path} was trained on different labels than this tinyddpm's shapes; train it again")
    evaluator = Evaluator(config["size"], config["base_channels"], config["max_channels"], config["num_labels"])
    evaluator.load_state_dict(ckpt["state_dict"])
    evaluator.metrics = dict(ckpt.get("metrics", {}))
    return evaluator.eval()


# ------------------------------------------------------------------------------------------------ training
def _check_out_path(path, force):
    """Fail before minutes of training, not after: out must be a new (or, with force, replaceable) file."""
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a folder; pass a file path such as runs/evaluator.pt")
    if os.path.exists(path) and not force:
        raise UserError(f"{path} already exists; pass --force to replace it, or choose another --out")


@dataclasses.dataclass(frozen=True)
class EvaluatorTraining:
    """What train_evaluator renders and how it fits: image size, scenes, optimizer steps and their settings."""
    size: int = 64
    n_train: int = 20000  # rendered train-split scenes
    steps: int = 1500
    seed: int = 0  # the training scenes, the weights and the batch order
    batch_size: int = 64
    lr: float = 2e-3  # the one-cycle schedule's peak
    n_heldout: int = 2000  # test-split scenes for the reported accuracy

    def check(self):
        for name in ("steps", "n_train", "batch_size", "n_heldout"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")


def train_evaluator(out_path, settings=EvaluatorTraining(), log=print, force=False, device="cpu"):
    """Render settings.n_train train-split scenes, fit the evaluator (BCE, AdamW, one-cycle learning rate), measure
    its accuracy on settings.n_heldout scenes of test-split label sets, save it to out_path. Returns (evaluator,
    metrics)."""
    out_path = os.fspath(out_path)
    _check_out_path(out_path, force)
    settings.check()
    size, n_train, steps, seed = settings.size, settings.n_train, settings.steps, settings.seed
    batch_size, lr, n_heldout = settings.batch_size, settings.lr, settings.n_heldout
    device = resolve_device(device)
    start, cpu_start = time.time(), time.process_time()  # CPU time too: wall time depends on what else runs
    images, labels = shapes.make_dataset("train", n_train, size, seed)
    held_images, held_labels = shapes.make_dataset("test", n_heldout, size, HELDOUT_SEED)
    log(f"rendered {n_train} train + {n_heldout} held-out scenes at {size}px in {time.time() - start:.1f}s")

    torch.manual_seed(seed)
    model = Evaluator(size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 [N, 3, S, S]; batches become floats on the fly
    y_all = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(n_train, (batch_size,), generator=gen)
        x = x_all[idx].to(device).float().div(127.5).sub(1.0)
        loss = F.binary_cross_entropy_with_logits(model(x), y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    train_seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    accuracy = evaluate_images(model, held_images, held_labels)
    metrics = dict(heldout_accuracy=accuracy, heldout_images=n_heldout, train_seconds=train_seconds,
                   train_cpu_seconds=cpu_seconds, torch_threads=torch.get_num_threads(), size=size, steps=steps,
                   n_train=n_train, batch_size=batch_size, seed=seed)
    save_evaluator(model, out_path, metrics)
    log(f"held-out accuracy {accuracy:.4f} on {n_heldout} test-split scenes; rendered and trained in "
        f"{train_seconds:.0f}s ({cpu_seconds:.0f}s CPU, {torch.get_num_threads()} threads); saved {out_path}")
    return model.eval(), metrics


# ------------------------------------------------------------------------------------------------ command line
def build_parser():
    p = ArgumentParser(prog="python -m tinyddpm.evaluator",
                       description="Train the shapes evaluator and print its held-out accuracy.")
    p.add_argument("--out", required=True, help="checkpoint file to write, e.g. runs/evaluator.pt")
    d = EvaluatorTraining()
    p.add_argument("--size", type=int, default=d.size, choices=shapes.SIZES, help="image size it scores")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--n-train", type=int, default=d.n_train, help="rendered training scenes")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="scenes per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--heldout", type=int, default=d.n_heldout, help="test-split scenes for the reported accuracy")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the training scenes and the weights")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 is fastest on a busy machine)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        raise UserError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EvaluatorTraining(args.size, args.n_train, args.steps, args.seed, args.batch_size, args.lr, args.heldout)
    _, metrics = train_evaluator(args.out, settings, force=args.force, device=args.device)
    print(f"heldout_accuracy {metrics['heldout_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
