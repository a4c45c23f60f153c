"""What one side of an FID is: an image folder, a uint8 image array, a dataset reference or a statistics file.

`resolve_source` is the one place that knows the input kinds, and it checks everything it can before anything
slow starts:
- a folder is searched recursively by imageio.scan_images (linked folders inside it once, none outside it; loops,
  dangling links, FIFOs, devices, hidden and non-image files are skipped and counted, never opened), its files
  decoded in DataLoader workers;
- a .npy/.npz uint8 array [N, H, W, 3] (also [N, H, W], [N, H, W, 1] and NCHW), memory-mapped for .npy;
- a dataset reference `cifar10:CLASSES:SPLIT[:N]`, read from --data-dir (downloaded there if missing);
- a pytorch-fid statistics file (.npz with mu [d] and sigma [d, d]). Its format is read and written here only.
"""
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from . import data
from .data import CIFAR10_CLASSES, CIFAR10_SPLITS, resolve_classes
from .distance import SYMMETRY_RTOL
from .errors import UserError
from .files import atomic_write_bytes
from .imageio import IMAGE_EXTENSIONS, describe_skipped, load_rgb, scan_images

MIN_IMAGES = 2  # a covariance needs at least two samples
FINGERPRINT_ROWS = 1024  # array rows hashed at a time, so a memory-mapped .npy is never read whole


# ---- dataset references: cifar10:CLASSES:SPLIT[:N] ---------------------------------------------------------------
CIFAR10_REF_PREFIX = "cifar10:"
CIFAR10_REF_FORMAT = "cifar10:CLASSES:SPLIT[:N], e.g. cifar10:cat:test, cifar10:cat,frog:train:1000 or cifar10:all:test"


@dataclass(frozen=True)
class CifarReference:
    """A named slice of CIFAR-10 used as one side of an FID: the first `count` images (file order) of `split` among
    `classes` (indices 0..9, in the order given). count None: all of them."""
    classes: tuple
    split: str
    count: Optional[int] = None

    @property
    def spec(self):
        names = "all" if len(self.classes) == len(CIFAR10_CLASSES) else ",".join(CIFAR10_CLASSES[i] for i in
                                                                                 self.classes)
        return f"cifar10:{names}:{self.split}" + ("" if self.count is None else f":{self.count}")

    def with_count(self, count):
        return CifarReference(self.classes, self.split, count)


def is_cifar_reference(spec):
    return isinstance(spec, str) and spec.lower().startswith(CIFAR10_REF_PREFIX)


def parse_cifar_reference(spec):
    """'cifar10:CLASSES:SPLIT[:N]' → CifarReference. CLASSES: names or indices joined by ',', or 'all' (an empty
    list is refused: 'cifar10::test' is a typo more often than a wish for all ten classes)."""
    parts = spec.strip().split(":")
    if len(parts) not in (3, 4) or parts[0].lower() != CIFAR10_REF_PREFIX[:-1]:
        raise UserError(f"cannot read dataset reference {spec!r}; write {CIFAR10_REF_FORMAT}")
    names = [c.strip().lower() for c in parts[1].split(",") if c.strip()]
    if not names:
        raise UserError(f"dataset reference {spec!r} names no class; name them (cifar10:cat:test) or write "
                        f"cifar10:all:{parts[2].strip() or 'test'} for all ten")
    classes = tuple(resolve_classes([] if names == ["all"] else names))
    split = parts[2].strip().lower()
    if split not in CIFAR10_SPLITS:
        raise UserError(f"unknown CIFAR-10 split {parts[2]!r} in {spec!r}; choose train or test")
    count = None
    if len(parts) == 4:
        if not parts[3].strip().isdigit() or int(parts[3]) < 1:
            raise UserError(f"the image count in {spec!r} must be a positive integer; write {CIFAR10_REF_FORMAT}")
        count = int(parts[3])
    return CifarReference(classes, split, count)


def load_cifar_reference(ref, data_dir, download=True):
    """uint8 [N, 32, 32, 3]: the images a CifarReference names (downloading CIFAR-10 into data_dir if needed)."""
    images, _ = data.load_cifar10(data_dir, ref.split, ref.classes, download=download)
    if ref.count is not None:
        if ref.count > len(images):
            raise UserError(f"{ref.spec} asks for {ref.count} images but the {ref.split} split has only "
                            f"{len(images)} of those classes; ask for at most {len(images)}")
        images = images[:ref.count]
    return images


# ---- what one side is -----------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One side of an FID. kind: "stats" (mu, sigma known), "folder" (paths) or "array" (uint8 NHWC)."""
    kind: str
    name: str
    paths: Optional[list] = None
    array: Optional[np.ndarray] = None
    mu: Optional[np.ndarray] = None
    sigma: Optional[np.ndarray] = None
    skipped: list = field(default_factory=list)  # (path, why) of folder entries that are not images

    def __len__(self):
        return len(self.paths) if self.kind == "folder" else len(self.array) if self.kind == "array" else 0

    def describe_skipped(self):
        return describe_skipped(self.name, self.skipped)

    def fingerprint(self):
        """What is measured, for a cache key: each file's name, size and mtime, or the bytes of an array."""
        h = hashlib.sha256(self.kind.encode())
        if self.kind == "folder":
            for p in self.paths:
                try:
                    st = os.stat(p)
                    what = f"{st.st_size}|{st.st_mtime_ns}"
                except OSError as e:  # gone since it was listed: the decoder will say so
                    what = f"error {e.errno}"
                h.update(os.fsencode(os.path.relpath(p, self.name)) + f"|{what}\n".encode())
        elif self.kind == "array":
            h.update(str(self.array.shape).encode())
            for i in range(0, len(self.array), FINGERPRINT_ROWS):
                h.update(np.ascontiguousarray(self.array[i:i + FINGERPRINT_ROWS]).tobytes())
        else:
            h.update(self.mu.tobytes() + self.sigma.tobytes())
        return h.hexdigest()

    def batches(self, batch_size=50, num_workers=0, skip_bad=False, report=None):
        """Image batches: uint8 [B, H, W, 3], or float [B, 3, 299, 299] where a folder mixes sizes (see _collate).
        `report(skipped)` is called at the end with the count of unreadable files skipped."""
        if self.kind == "array":
            for i in range(0, len(self.array), batch_size):
                yield np.array(self.array[i:i + batch_size])  # a writable copy (memory-mapped .npy is read-only)
            return
        loader = torch.utils.data.DataLoader(_ImageFiles(self.paths), batch_size=min(batch_size, len(self)),
                                             num_workers=num_workers, collate_fn=_collate)
        skipped = 0
        for images, errors in loader:
            if errors and not skip_bad:
                raise UserError(f"{errors[0]} (or pass --skip-bad to skip unreadable images)")
            skipped += len(errors)
            if images is not None:
                yield images
        if report:
            report(skipped)


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
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise UserError(f"{name} holds images of {arr.shape[1]}×{arr.shape[2]} pixels; pass real images")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if len(arr) < MIN_IMAGES:
        raise UserError(f"{name} holds {len(arr)} image(s); FID needs at least {MIN_IMAGES}")
    return arr


def resolve_source(spec, data_dir=DataConfig.data_dir):
    """A path, a dataset reference or a uint8 array → Source, checked up front (exists, has ≥ 2 images, stats
    well-formed). A dataset reference is read from data_dir; an existing path of that name wins. Entries of a
    folder that are not images are left out and listed in Source.skipped (measuring says so in one line)."""
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
        paths, skipped = scan_images(path)
        if len(paths) < MIN_IMAGES:
            what = "no images" if not paths else f"only {len(paths)} image"
            raise UserError(f"{path} has {what} (looked recursively for {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)});"
                            f" FID needs at least {MIN_IMAGES}")
        return Source("folder", path, paths=paths, skipped=skipped)
    if not os.path.isfile(path):  # a FIFO or device: reading it could block forever
        raise UserError(f"{path} is not a regular file; pass a folder of images, a .npz or a .npy file")
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
            mu, sigma = load_statistics(path, data)
            return Source("stats", path, mu=mu, sigma=sigma)
        arrays = [v for v in data.values() if v.ndim >= 3]
        if len(arrays) != 1:
            raise UserError(f"{path} has keys {sorted(data)}; expected mu and sigma (statistics) or one uint8 "
                            f"image array [N, H, W, 3]")
        return Source("array", path, array=as_uint8_images(arrays[0], path))
    raise UserError(f"{path} is not a folder, .npz or .npy; pass a folder of images or a statistics file")


# ---- the pytorch-fid statistics file (.npz, keys mu and sigma) ----------------------------------------------------
def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, …: the user's file is not a readable .npz
        raise UserError(f"cannot read {path} as .npz ({e.__class__.__name__}); pass a pytorch-fid stats file "
                        f"(mu, sigma) or a uint8 image array") from None


def check_statistics(mu, sigma, name):
    """mu [d] and sigma [d, d], real floating point, finite, d ≥ 1, sigma symmetric with a non-negative diagonal
    → copies in their stored precision (distance.py tells a float32 sigma's rounding noise from its data by it).
    Anything else is a damaged or foreign file: one UserError naming `name`."""
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    real = all(np.issubdtype(a.dtype, np.floating) for a in (mu, sigma))
    if not real:
        raise UserError(f"{name}: mu is {mu.dtype} and sigma {sigma.dtype}; statistics must be real floating point "
                        f"(a complex or integer covariance is not one); recompute them")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{name}: mu {mu.shape} / sigma {sigma.shape} are not a mean [d] and covariance [d, d]")
    if mu.shape[0] == 0:
        raise UserError(f"{name}: the statistics have 0 features; recompute them from images")
    mu64, sigma64 = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu64).all() and np.isfinite(sigma64).all()):
        raise UserError(f"{name}: mu or sigma contains NaN/inf; recompute the statistics")
    scale = max(np.abs(sigma64).max(), np.finfo(np.float64).tiny)
    if np.abs(sigma64 - sigma64.T).max() > SYMMETRY_RTOL * scale or np.diag(sigma64).min() < -SYMMETRY_RTOL * scale:
        raise UserError(f"{name}: sigma is not a covariance (not symmetric, or a negative variance); recompute it")
    return mu.copy(), sigma.copy()


def load_statistics(path, data=None):
    """(mu, sigma) in their stored precision from a pytorch-fid style .npz (keys mu, sigma; `data`: its arrays if
    already read), validated (check_statistics)."""
    data = _read_npz(path) if data is None else data
    if "mu" not in data or "sigma" not in data:
        raise UserError(f"{path} has keys {sorted(data)}; a statistics file needs mu and sigma")
    return check_statistics(data["mu"], data["sigma"], path)


def save_statistics(path, mu, sigma, force=False, **extra):
    """Write mu/sigma in pytorch-fid's format (np.savez_compressed, keys mu and sigma; `extra` arrays beside them,
    which pytorch-fid ignores), atomically."""
    path = os.fspath(path)
    if not path.lower().endswith(".npz"):
        raise UserError(f"statistics file {path} must end in .npz (pytorch-fid recognises stats files by it)")
    if os.path.isdir(path) or (os.path.exists(path) and not force):
        raise UserError(f"{path} already exists; pass --force to overwrite it or choose another name")
    buf = io.BytesIO()
    np.savez_compressed(buf, mu=np.asarray(mu), sigma=np.asarray(sigma), **extra)
    atomic_write_bytes(path, buf.getvalue())


# ---- decoding folders in DataLoader workers -----------------------------------------------------------------------
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
        except Exception as e:  # a crafted file can make a decoder raise nearly anything (struct.error, …)
            return f"cannot read image {self.paths[i]} ({e.__class__.__name__}); remove or replace the file"


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
