"""Inception features of image sets, and their mean/covariance: streamed in float64, cached, one Measurement each.

Where images come from is sources.py's business (folders, arrays, dataset references, statistics files); the
network is inception.py's and the distances are distance.py's. Here features are computed batch by batch and
folded into `RunningStats`, so a large set never has all of its features in memory unless they are asked for
(KID, precision/recall and the memorisation check need them). One cache holds Measurements, keyed by what was
measured and the weights; it is consulted only when a cache folder is given.
"""
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .config import DataConfig
from .cpu import follow_free_cores
from .errors import UserError
from .sources import MIN_IMAGES, check_statistics, load_statistics, resolve_source, save_statistics

PROGRESS_EVERY_S = 5.0  # seconds between progress lines on stderr
PROBE_SHAPE = (1, 3, 8, 8)  # one blank image, enough to learn how many features a network gives
# Images per Inception forward on a CPU, whatever batch generated them: at 50 (pytorch-fid's and fid.py's default)
# the 299 px activations stay cache-sized, so the features come faster than at the report's sampling batch, and
# the same to the bit (measured: docs/speed.md). A GPU keeps the caller's batch.
CPU_FEATURE_BATCH = 50
CACHE_VERSION = "measurement-1"  # part of every cache key: bump it when an entry's contents change meaning


class RunningStats:
    """Streaming mean and covariance (ddof=1, as np.cov) in float64. Sums are taken around the first batch's mean,
    which keeps the E[xxᵀ] − μμᵀ cancellation harmless."""

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def update(self, feats):  # feats: [B, d]
        x = np.asarray(feats, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum, self.outer = np.zeros_like(self.shift), np.zeros((x.shape[1],) * 2)
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def mean(self):
        self._check()
        return self.shift + self.sum / self.n

    def cov(self):
        self._check()
        m = self.sum / self.n
        return (self.outer - self.n * np.outer(m, m)) / (self.n - 1)

    def _check(self):  # e.g. every file of a folder skipped as unreadable
        if self.n < MIN_IMAGES:
            raise UserError(f"only {self.n} image(s) could be measured; FID needs at least {MIN_IMAGES}")


def statistics_from_features(feats):
    """[N, d] → (mu [d], sigma [d, d]) in float64, equal to np.mean / np.cov(rowvar=False)."""
    acc = RunningStats()
    acc.update(feats)
    return acc.mean(), acc.cov()


@dataclass
class Measurement:
    """One side of an FID: mu/sigma, the images behind them, and their features when kept."""
    mu: np.ndarray
    sigma: np.ndarray
    n: Optional[int]  # images measured (None for a stats file: pytorch-fid's format does not store it)
    features: Optional[np.ndarray] = None  # float32 [N, d], only when asked for (a stats file has none)
    skipped: int = 0  # unreadable files skipped with skip_bad

    @classmethod
    def from_features(cls, feats):
        return cls(*statistics_from_features(feats), n=len(feats), features=feats)

    def head(self, n):
        """The Measurement of the first n images (features needed): the floor is a prefix of the train split."""
        return Measurement.from_features(self.features[:n])


class Progress:
    """'label: done/total images, N img/s, ETA' on stderr every few seconds and once at the end."""

    def __init__(self, total, label, enabled=True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start, self.last = 0, time.time(), time.time()

    def update(self, n):
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= PROGRESS_EVERY_S or (self.total and self.done >= self.total)):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = f", ETA {(self.total - self.done) / rate:.0f} s" if self.total else ""
            print(f"{self.label}: {self.done}/{self.total or '?'} images, {rate:.1f} img/s{eta}", file=sys.stderr)


def _to_input(batch, device):
    """uint8 [B, H, W, 3] (numpy or tensor) or float [B, 3, H, W] in [0, 1] → float [B, 3, H, W] on device."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if batch.dtype == torch.uint8:
        return batch.to(device).permute(0, 3, 1, 2).float().div_(255)  # same values as PIL → to_tensor
    return batch.to(device)


# How an allocation failure reads: CUDA, the CPU allocator (Linux; Windows), MPS.
OOM_PHRASES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


def is_out_of_memory(e):
    """Whether an exception is a failed allocation (torch.OutOfMemoryError, or the CPU allocator's RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError)
                                                     and any(p in str(e).lower() for p in OOM_PHRASES))


def iter_features(batches, model, device="cpu", progress=None):
    """Yield float32 features [B, d] (numpy) for each batch of images."""
    for batch in batches:
        follow_free_cores()  # the thread count follows the free cores through a long pass (tinyddpm/cpu.py)
        try:
            with torch.inference_mode():
                feats = model(_to_input(batch, device))
        except RuntimeError as e:  # torch.OutOfMemoryError is one; a CPU allocation failure is a plain one
            if not is_out_of_memory(e):
                raise
            raise UserError(f"out of memory measuring a batch of {len(batch)} images on {device}; pass a smaller "
                            f"--batch-size") from None
        if progress:
            progress.update(len(feats))
        yield feats.float().cpu().numpy()


def _batched(images, batch_size):
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    for arr in images:
        for i in range(0, len(arr), batch_size):
            yield arr[i:i + batch_size]


def feature_batch(batch_size, device):
    """Images per Inception forward for a caller whose batch was chosen for something else (sampling)."""
    return min(batch_size, CPU_FEATURE_BATCH) if torch.device(device).type == "cpu" else batch_size


def features_from_uint8(images, model, batch_size=50, device="cpu", progress=False):
    """uint8 images [N, H, W, 3] (numpy/tensor) or an iterable of such batches → float32 features [N, d]."""
    bar = Progress(len(images) if hasattr(images, "shape") else 0, "features", progress)
    return np.concatenate(list(iter_features(_batched(images, batch_size), model, device, bar)))


def statistics_from_uint8(images, model, batch_size=50, device="cpu", progress=False):
    """Like features_from_uint8, but streams into (mu, sigma) without keeping the features."""
    acc, bar = RunningStats(), Progress(len(images) if hasattr(images, "shape") else 0, "features", progress)
    for feats in iter_features(_batched(images, batch_size), model, device, bar):
        acc.update(feats)
    return acc.mean(), acc.cov()


@dataclass(frozen=True)
class Reading:
    """How a source's files are read, which never changes the numbers: DataLoader processes decoding a folder's
    images, and whether progress lines go to stderr."""
    num_workers: int = 0
    progress: bool = True


def measure(source, model, batch_size=50, device="cpu", skip_bad=False, keep_features=False, cache_dir=None,
            reading=Reading()):
    """A Source (sources.resolve_source) → Measurement. With a cache_dir, a folder or array is looked up there
    first and stored after (its fingerprint is taken only then); keep_features also keeps, and caches, the
    features. A statistics file gives its mu/sigma (and no features)."""
    if source.kind == "stats":
        return Measurement(source.mu, source.sigma, None)
    if source.skipped:
        print(source.describe_skipped(), file=sys.stderr)
    key = None
    if cache_dir:
        key = _cache_key(source.fingerprint(), model.weights_id, f"skip_bad={bool(skip_bad)}")
        hit = _load_cached(key, cache_dir, keep_features)
        if hit is not None:
            print(f"{source.name}: {'features' if keep_features else 'statistics'} from cache "
                  f"{_cache_path(key, cache_dir)}", file=sys.stderr)
            return hit
    skipped = []
    batches = source.batches(batch_size, reading.num_workers, skip_bad, report=skipped.append)
    acc, kept = RunningStats(), []
    for feats in iter_features(batches, model, device, Progress(len(source), source.name, reading.progress)):
        acc.update(feats)
        if keep_features:
            kept.append(feats)
    skipped = skipped[0] if skipped else 0
    if skipped:
        print(f"{source.name}: skipped {skipped} unreadable image(s)", file=sys.stderr)
    m = Measurement(acc.mean(), acc.cov(), acc.n, np.concatenate(kept) if keep_features else None, skipped)
    if key:
        _save_cached(key, cache_dir, m)
    return m


def compute_statistics(path_or_array, model=None, batch_size=50, device="cpu", skip_bad=False, cache_dir=None,
                       data_dir=None, reading=Reading(progress=False)):
    """(mu, sigma) of a folder, .npz stats file, .npy/.npz image array, dataset reference or uint8 [N, H, W, 3].
    model: a loaded Inception (inception.load_inception), the path of its weights, or None for the default ones."""
    source = resolve_source(path_or_array, data_dir or DataConfig.data_dir)
    if (model is None or isinstance(model, (str, os.PathLike))) and source.kind != "stats":
        from .inception import load_inception

        model = load_inception(model, device)
    m = measure(source, model, batch_size, device, skip_bad, cache_dir=cache_dir, reading=reading)
    return m.mu, m.sigma


def feature_dim(model, device="cpu"):
    """How many features the network gives, from one forward pass on a blank image."""
    with torch.inference_mode():
        return int(model(torch.zeros(PROBE_SHAPE, device=device)).shape[1])


def check_dimensions(sources, model=None, device="cpu"):
    """Refuse a statistics file whose width differs from the network's features (model given) or from the other
    statistics files (model None), before any image is measured."""
    stats = [s for s in sources if s.kind == "stats"]
    if not stats:
        return
    want, what = stats[0].mu.shape[0], stats[0].name
    if model is not None:
        want, what = feature_dim(model, device), "the Inception"
    for s in stats:
        if s.mu.shape[0] != want:
            raise UserError(f"the statistics have different sizes: {s.name} has {s.mu.shape[0]} features, {what} "
                            f"has {want}; compute both sides with the same Inception")


# ---- the cache: one .npz per Measurement ---------------------------------------------------------------------------
def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tinyddpm", "fid")


def _cache_key(*parts):
    return hashlib.sha256("\n".join((CACHE_VERSION, *map(str, parts))).encode()).hexdigest()[:32]


def _cache_path(key, cache_dir):
    return os.path.join(cache_dir, f"fid-{key}.npz")


def _load_cached(key, cache_dir, need_features):
    """The Measurement stored under `key`, or None: missing, damaged, or without the features asked for."""
    path = _cache_path(key, cache_dir)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = check_statistics(f["mu"], f["sigma"], path)
            n, skipped = int(f["n"]), int(f["skipped"])
            feats = f["features"] if need_features and "features" in f.files else None
    except (UserError, OSError, ValueError, KeyError):  # a damaged entry counts as a miss and is rewritten
        return None
    if need_features and (feats is None or feats.shape != (n, len(mu))):
        return None
    return Measurement(mu, sigma, n, feats, skipped)


def _save_cached(key, cache_dir, m):
    extra = dict(n=m.n, skipped=m.skipped)
    if m.features is not None:
        extra["features"] = m.features
    try:
        save_statistics(_cache_path(key, cache_dir), m.mu, m.sigma, force=True, **extra)
    except UserError as e:  # a full or read-only cache must not cost the result just measured
        print(f"warning: not cached ({e})", file=sys.stderr)
