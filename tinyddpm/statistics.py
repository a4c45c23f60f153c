"""Inception features of image sets, and their mean/covariance: streamed in float64, saved as pytorch-fid .npz.

Where images come from is decided in one place, `resolve_source`: a folder (recursive), a .npz statistics file
(keys mu, sigma), a .npy/.npz uint8 image array, or an in-memory uint8 array [N, H, W, 3]. Features are computed
batch by batch and folded into `RunningStats`, so a large set never has all of its features in memory.
"""
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .files import atomic_write_bytes
from .config import DataConfig
from .data import CIFAR10_REF_FORMAT, is_cifar_reference, load_cifar_reference, parse_cifar_reference
from .imageio import IMAGE_EXTENSIONS, list_images, load_rgb

MIN_IMAGES = 2  # a covariance needs at least two samples
PROGRESS_EVERY_S = 5.0  # seconds between progress lines on stderr
DEFAULT_DATA_DIR = DataConfig.data_dir  # where dataset references are read from, as for train.py


# ---- where images come from ---------------------------------------------------------------------------------------
@dataclass
class Source:
    """What one side of an FID is. kind: "stats" (mu, sigma known), "folder" (paths) or "array" (uint8 NHWC)."""
    kind: str
    name: str
    paths: Optional[list] = None
    array: Optional[np.ndarray] = None
    mu: Optional[np.ndarray] = None
    sigma: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.paths) if self.kind == "folder" else len(self.array) if self.kind == "array" else 0


def as_uint8_images(arr, name):
    """Check/convert an array to uint8 [N, H, W, 3]: grayscale [N, H, W] or [N, H, W, 1] and NCHW are accepted."""
    arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if arr.dtype != np.uint8:
        raise UserError(f"{name} holds {arr.dtype} values; FID needs uint8 images [N, H, W, 3] in 0..255")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # NCHW → NHWC
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UserError(f"{name} has shape {arr.shape}; expected uint8 images [N, H, W, 3]")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if len(arr) < MIN_IMAGES:
        raise UserError(f"{name} holds {len(arr)} image(s); FID needs at least {MIN_IMAGES}")
    return arr


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, …: the user's file is not a readable .npz
        raise UserError(f"cannot read {path} as .npz ({e.__class__.__name__}); pass a pytorch-fid stats file "
                        f"(mu, sigma) or a uint8 image array") from None


def check_statistics(mu, sigma, name):
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not np.issubdtype(mu.dtype, np.floating):
        raise UserError(f"{name}: mu {mu.shape} / sigma {sigma.shape} are not a mean [d] and covariance [d, d]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{name}: mu or sigma contains NaN/inf; recompute the statistics")
    return mu.astype(np.float64), sigma.astype(np.float64)


def load_statistics(path):
    """(mu, sigma) from a pytorch-fid style .npz (keys mu, sigma)."""
    data = _read_npz(path)
    if "mu" not in data or "sigma" not in data:
        raise UserError(f"{path} has keys {sorted(data)}; a statistics file needs mu and sigma")
    return check_statistics(data["mu"], data["sigma"], path)


def save_statistics(path, mu, sigma, force=False):
    """Write mu/sigma in pytorch-fid's format (np.savez_compressed, keys mu and sigma), atomically."""
    path = os.fspath(path)
    if not path.lower().endswith(".npz"):
        raise UserError(f"statistics file {path} must end in .npz (pytorch-fid recognises stats files by it)")
    if os.path.isdir(path) or (os.path.exists(path) and not force):
        raise UserError(f"{path} already exists; pass --force to overwrite it or choose another name")
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, mu=np.asarray(mu), sigma=np.asarray(sigma))
    atomic_write_bytes(path, buf.getvalue())


def resolve_source(spec, data_dir=DEFAULT_DATA_DIR):
    """A path, a dataset reference or a uint8 array → Source, checked up front (exists, has ≥ 2 images, stats
    well-formed). The one place that knows input kinds.

    A dataset reference (`cifar10:cat:test`, see data.parse_cifar_reference) is read from data_dir, downloading
    CIFAR-10 there if needed, so nobody has to export the real images as PNGs. An existing path of that name wins."""
    if isinstance(spec, np.ndarray):
        return Source("array", "array", array=as_uint8_images(spec, "image array"))
    path = os.fspath(spec)
    if is_cifar_reference(path) and not os.path.exists(path):
        ref = parse_cifar_reference(path)
        return Source("array", ref.spec, array=as_uint8_images(load_cifar_reference(ref, data_dir), ref.spec))
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass a folder of images, a .npz statistics file, a .npy/.npz array "
                        f"or a dataset reference ({CIFAR10_REF_FORMAT})")
    if os.path.isdir(path):
        paths = list_images(path)
        if len(paths) < MIN_IMAGES:
            what = "no images" if not paths else f"only {len(paths)} image"
            raise UserError(f"{path} has {what} (looked recursively for {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)});"
                            f" FID needs at least {MIN_IMAGES}")
        return Source("folder", path, paths=paths)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)  # memory-mapped: batches are read as needed
        except Exception as e:
            raise UserError(f"cannot read {path} as .npy ({e.__class__.__name__}); pass a uint8 image array") from None
        return Source("array", path, array=as_uint8_images(arr, path))
    if ext == ".npz":
        data = _read_npz(path)
        if "mu" in data or "sigma" in data:
            mu, sigma = load_statistics(path)
            return Source("stats", path, mu=mu, sigma=sigma)
        arrays = [v for v in data.values() if v.ndim >= 3]
        if len(arrays) != 1:
            raise UserError(f"{path} has keys {sorted(data)}; expected mu and sigma (statistics) or one uint8 "
                            f"image array [N, H, W, 3]")
        return Source("array", path, array=as_uint8_images(arrays[0], path))
    raise UserError(f"{path} is not a folder, .npz or .npy; pass a folder of images or a statistics file")


# ---- batches of images ---------------------------------------------------------------------------------------------
class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one file in a DataLoader worker; a bad file comes back as its error message, never as a crash."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return np.array(load_rgb(self.paths[i]), dtype=np.uint8)  # a writable copy
        except UserError as e:
            return str(e)


def _collate(items):
    """→ (images, errors). Same-size images stay uint8 [B, H, W, 3]; mixed sizes are each resized to 299×299 here
    (float [B, 3, 299, 299] in [0, 1], the same bilinear op the network applies, so the result is identical)."""
    good = [x for x in items if not isinstance(x, str)]
    errors = [x for x in items if isinstance(x, str)]
    if not good:
        return None, errors
    if len({x.shape for x in good}) == 1:
        return np.stack(good), errors
    from .inception import INPUT_SIZE

    resized = [F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255, size=(INPUT_SIZE,) * 2,
                             mode="bilinear", align_corners=False) for x in good]
    return torch.cat(resized), errors


def iter_batches(source, batch_size=50, num_workers=0, skip_bad=False, report=None):
    """Yield image batches of a folder/array Source. `report(skipped)` is called at the end with the bad-file count."""
    if source.kind == "array":
        for i in range(0, len(source.array), batch_size):
            yield np.array(source.array[i:i + batch_size])  # a writable copy (memory-mapped .npy is read-only)
        return
    loader = torch.utils.data.DataLoader(_ImageFiles(source.paths), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate)
    skipped = 0
    for images, errors in loader:
        if errors and not skip_bad:
            raise UserError(f"{errors[0]} (or pass --skip-bad to skip unreadable images)")
        skipped += len(errors)
        if images is not None:
            yield images
    if report:
        report(skipped)


# ---- features and their statistics ------------------------------------------------------------------------------
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
        return self.shift + self.sum / self.n

    def cov(self):
        if self.n < MIN_IMAGES:
            raise UserError(f"only {self.n} image(s) were measured; FID needs at least {MIN_IMAGES}")
        m = self.sum / self.n
        return (self.outer - self.n * np.outer(m, m)) / (self.n - 1)


def statistics_from_features(feats):
    """[N, d] → (mu [d], sigma [d, d]) in float64, equal to np.mean / np.cov(rowvar=False)."""
    acc = RunningStats()
    acc.update(feats)
    return acc.mean(), acc.cov()


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


def iter_features(batches, model, device="cpu", progress=None):
    """Yield float32 features [B, 2048] (numpy) for each batch of images."""
    for batch in batches:
        with torch.inference_mode():
            feats = model(_to_input(batch, device))
        if progress:
            progress.update(len(feats))
        yield feats.float().cpu().numpy()


def _batched(images, batch_size):
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    for arr in images:
        for i in range(0, len(arr), batch_size):
            yield arr[i:i + batch_size]


def features_from_uint8(images, model, batch_size=50, device="cpu", progress=False):
    """uint8 images [N, H, W, 3] (numpy/tensor) or an iterable of such batches → float32 features [N, 2048]."""
    bar = Progress(len(images) if hasattr(images, "shape") else 0, "features", progress)
    return np.concatenate(list(iter_features(_batched(images, batch_size), model, device, bar)))


def statistics_from_uint8(images, model, batch_size=50, device="cpu", progress=False):
    """Like features_from_uint8, but streams into (mu, sigma) without keeping the features."""
    acc, bar = RunningStats(), Progress(len(images) if hasattr(images, "shape") else 0, "features", progress)
    for feats in iter_features(_batched(images, batch_size), model, device, bar):
        acc.update(feats)
    return acc.mean(), acc.cov()


@dataclass
class Measurement:
    mu: np.ndarray
    sigma: np.ndarray
    n: Optional[int]  # images measured (None for a stats file: pytorch-fid's format does not store it)
    features: Optional[np.ndarray] = None  # float32 [N, 2048], only with keep_features (KID needs them)
    skipped: int = 0  # unreadable files skipped with skip_bad


def measure(source, model, batch_size=50, device="cpu", num_workers=0, skip_bad=False, keep_features=False,
            progress=True, cache_dir=None):
    """A Source (see resolve_source) → Measurement. Statistics of folders/arrays are cached in `cache_dir`
    (None: no cache) under a key made of what was measured and the weights."""
    if source.kind == "stats":
        if keep_features:
            raise UserError(f"{source.name} is a statistics file; KID needs image features, pass images instead")
        return Measurement(source.mu, source.sigma, None)
    key = statistics_cache_key(source_fingerprint(source), model.weights_id, f"skip_bad={skip_bad}")
    if cache_dir and not keep_features:
        hit = load_cached_statistics(key, cache_dir)
        if hit is not None:
            print(f"{source.name}: statistics from cache {cache_path(key, cache_dir)}", file=sys.stderr)
            return Measurement(*hit, n=None)
    skipped = []
    batches = iter_batches(source, batch_size, num_workers, skip_bad, report=skipped.append)
    acc, kept = RunningStats(), []
    for feats in iter_features(batches, model, device, Progress(len(source), source.name, progress)):
        acc.update(feats)
        if keep_features:
            kept.append(feats)
    if skipped and skipped[0]:
        print(f"{source.name}: skipped {skipped[0]} unreadable image(s)", file=sys.stderr)
    mu, sigma = acc.mean(), acc.cov()
    if cache_dir:
        save_cached_statistics(key, cache_dir, mu, sigma)
    return Measurement(mu, sigma, acc.n, np.concatenate(kept) if keep_features else None, skipped[0] if skipped else 0)


def compute_statistics(path_or_array, model=None, batch_size=50, device="cpu", num_workers=0, skip_bad=False,
                       progress=False, cache_dir=None, weights=None):
    """(mu, sigma) of a folder, .npz stats file, .npy/.npz image array or uint8 array [N, H, W, 3]."""
    source = resolve_source(path_or_array)
    if model is None and source.kind != "stats":
        from .inception import load_inception

        model = load_inception(weights, device)
    m = measure(source, model, batch_size, device, num_workers, skip_bad, progress=progress, cache_dir=cache_dir)
    return m.mu, m.sigma


# ---- cache ----------------------------------------------------------------------------------------------------------
def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tinyddpm", "fid")


def source_fingerprint(source):
    """What was measured: file names, sizes and mtimes of a folder, or the bytes of an array."""
    h = hashlib.sha256(source.kind.encode())
    if source.kind == "folder":
        for p in source.paths:
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, source.name)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    elif source.kind == "array":
        h.update(str(source.array.shape).encode())
        for i in range(0, len(source.array), 1024):
            h.update(np.ascontiguousarray(source.array[i:i + 1024]).tobytes())
    else:
        h.update(source.mu.tobytes() + source.sigma.tobytes())
    return h.hexdigest()


def statistics_cache_key(*parts):
    """One hex key for any description of a measurement, e.g. (source_fingerprint, model.weights_id)."""
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:32]


def cache_path(key, cache_dir):
    return os.path.join(cache_dir, f"stats-{key}.npz")


def load_cached_statistics(key, cache_dir):
    """(mu, sigma) stored under `key`, or None (a damaged cache entry counts as a miss)."""
    path = cache_path(key, cache_dir)
    if not os.path.isfile(path):
        return None
    try:
        return load_statistics(path)
    except UserError:
        return None


def save_cached_statistics(key, cache_dir, mu, sigma):
    save_statistics(cache_path(key, cache_dir), mu, sigma, force=True)


def cached_features(source, model, cache_dir, batch_size=50, device="cpu", progress=True):
    """float32 features [N, 2048] of a folder/array Source, kept in cache_dir (None: no cache) as feats-<key>.npy.
    Used for reference images, which are measured again and again: KID needs the features, not only mu/sigma."""
    key = statistics_cache_key(source_fingerprint(source), model.weights_id, "features")
    path = os.path.join(cache_dir, f"feats-{key}.npy") if cache_dir else None
    if path and os.path.isfile(path):
        try:
            feats = np.load(path, allow_pickle=False)
            if feats.ndim == 2 and len(feats) == len(source):
                print(f"{source.name}: features from cache {path}", file=sys.stderr)
                return feats
        except (OSError, ValueError):  # a damaged cache entry counts as a miss and is rewritten
            pass
    batches = iter_batches(source, batch_size)
    feats = np.concatenate(list(iter_features(batches, model, device, Progress(len(source), source.name, progress))))
    if path:
        import io

        buf = io.BytesIO()
        np.save(buf, feats)
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    return feats
