"""Training data: CIFAR-10 (downloaded, verified, extracted safely), image folders, flips and a resumable sampler.

Everything is held in memory as uint8: CIFAR-10 is 150 MB, and the training loop turns each batch into floats in
[-1, 1] on the fly (`to_float`). The data order comes from `BatchSampler`, whose state goes into checkpoints so a
resumed run sees exactly the batches an uninterrupted one would have seen.
"""
import hashlib
import http.client
import os
import pickle
import shutil
import sys
import tarfile
import tempfile

import numpy as np
import torch

from .errors import UserError
from .files import download
from .imageio import describe_skipped, load_rgb, resize_center_crop, scan_images
from .imageio import to_uint8  # noqa: F401  (the inverse of to_float below; one quantisation, kept in imageio)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"  # the tarball's single top-level folder
CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_SIZE = 32
CHUNK = 1 << 20  # bytes per read when hashing
FLIP_PROB = 0.5
SEED_MODULUS = 2**64  # numpy seeds must be non-negative; a negative --seed maps to its two's complement
EXTRACT_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python ≥ 3.11.4: belt and braces


# ----------------------------------------------------------------------------------------------------- CIFAR-10
def resolve_classes(names_or_indices):
    """Class names ("cat") or indices (3, "3") → CIFAR-10 indices in the order given; () or None → all ten."""
    if isinstance(names_or_indices, (str, int, np.integer)):
        names_or_indices = [names_or_indices]
    if names_or_indices is None or len(names_or_indices) == 0:
        return list(range(len(CIFAR10_CLASSES)))
    out = []
    for c in names_or_indices:
        s = str(c).strip().lower()
        if s.isdigit() and int(s) < len(CIFAR10_CLASSES):
            idx = int(s)
        elif s in CIFAR10_CLASSES:
            idx = CIFAR10_CLASSES.index(s)
        else:
            raise UserError(f"unknown CIFAR-10 class {c!r}; choose names or indices 0-9 from: "
                            + ", ".join(f"{i}={n}" for i, n in enumerate(CIFAR10_CLASSES)))
        if idx not in out:  # a class named twice counts once, so labels stay 0..K-1
            out.append(idx)
    return out


def _md5(path):
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _where_to_put(root):
    return f"put {CIFAR10_TARBALL} (from {CIFAR10_URL}) or the extracted {CIFAR10_FOLDER}/ into {root}"


def _download(url, dest, md5, timeout):
    """Download the tarball to `dest` (temp file, md5 checked, renamed); every failure is one UserError."""
    folder = os.path.dirname(dest)

    def check(got):
        if md5 and got != md5:
            raise UserError(f"downloaded {url} has md5 {got}, expected {md5} (corrupt or wrong file; deleted it); "
                            f"run again or {_where_to_put(folder)}")

    try:
        download(url, dest, "md5", check, timeout,
                 announce=lambda: print(f"downloading CIFAR-10 from {url} into {folder}", file=sys.stderr))
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeout, refused, cut, disk full
        reason = str(getattr(e, "reason", None) or e).replace("\n", " ")
        raise UserError(f"cannot download CIFAR-10 ({reason}); {_where_to_put(folder)}") from None


def _safe_extract(tar_path, root):
    """Extract the tarball's CIFAR10_FOLDER into root via a temp folder; refuse absolute, '..' or link members."""
    tmp = tempfile.mkdtemp(prefix=".cifar-extract-", dir=root)
    try:
        # One streaming pass ("r|*"): listing the members first would decompress the 170 MB twice.
        with tarfile.open(tar_path, "r|*") as tar:
            for m in tar:
                parts = m.name.replace("\\", "/").split("/")
                if os.path.isabs(m.name) or m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise UserError(f"{tar_path} has an unsafe member {m.name!r}; it is not the CIFAR-10 tarball, "
                                    f"delete it and {_where_to_put(root)}")
                tar.extract(m, tmp, **EXTRACT_FILTER)
        if not _complete(os.path.join(tmp, CIFAR10_FOLDER)):
            raise UserError(f"{tar_path} does not contain a complete {CIFAR10_FOLDER}/; delete it and "
                            f"{_where_to_put(root)}")
        try:
            os.replace(os.path.join(tmp, CIFAR10_FOLDER), os.path.join(root, CIFAR10_FOLDER))
        except OSError:
            if not _complete(os.path.join(root, CIFAR10_FOLDER)):  # else another process (rank) got there first
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"cannot extract {tar_path} ({e.__class__.__name__}: {e}); delete it and "
                        f"{_where_to_put(root)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(batches):
    return all(os.path.isfile(os.path.join(batches, b)) for names in CIFAR10_SPLITS.values() for b in names)


def prepare_cifar10(root, url=CIFAR10_URL, md5=CIFAR10_MD5, download=True, timeout=60):
    """root/cifar-10-batches-py, extracting root/cifar-10-python.tar.gz (md5-checked) or downloading it first."""
    root = os.fspath(root)
    batches, tar = os.path.join(root, CIFAR10_FOLDER), os.path.join(root, CIFAR10_TARBALL)
    if _complete(batches):
        return batches
    if os.path.exists(batches):  # never overwrite a folder the user made
        raise UserError(f"{batches} is incomplete (needs data_batch_1..5 and test_batch); delete it and run again")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create data folder {root} ({e.strerror}); pass a writable --data-dir") from None
    if not os.access(root, os.W_OK):
        raise UserError(f"data folder {root} is not writable; pass a writable --data-dir")
    if not os.path.exists(tar):
        if not download:
            raise UserError(f"CIFAR-10 not found in {root}; {_where_to_put(root)}")
        _download(url, tar, md5, timeout)
    elif md5 and (got := _md5(tar)) != md5:  # a tarball the user put there: report it, never delete their file
        raise UserError(f"{tar} has md5 {got}, expected {md5} (incomplete or corrupt); delete it and run again")
    _safe_extract(tar, root)
    return batches


def download_cifar10(root, url=CIFAR10_URL, md5=CIFAR10_MD5, timeout=60):
    """Make CIFAR-10 available under root (download if needed); returns the cifar-10-batches-py folder."""
    return prepare_cifar10(root, url, md5, download=True, timeout=timeout)


class _BatchUnpickler(pickle.Unpickler):
    """The batches are pickles: allow only the numpy globals a CIFAR batch needs, so a foreign file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def load_cifar10(root, split="train", classes=(), download=True, url=CIFAR10_URL, md5=CIFAR10_MD5):
    """Images uint8 [N, 32, 32, 3] and original labels int64 [N] (0..9) of the requested classes, in file order."""
    if split not in CIFAR10_SPLITS:
        raise UserError(f"unknown CIFAR-10 split {split!r}; choose train or test")
    wanted = resolve_classes(classes)
    batches = prepare_cifar10(root, url, md5, download=download)
    images, labels = [], []
    for name in CIFAR10_SPLITS[split]:
        path = os.path.join(batches, name)
        try:
            with open(path, "rb") as f:
                d = _BatchUnpickler(f, encoding="latin1").load()
            data, y = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["labels"], dtype=np.int64)
            # Each row is 3072 bytes: the R, G and B planes of a 32×32 image, row-major → [n, 3, 32, 32].
            data = data.reshape(-1, 3, CIFAR10_SIZE, CIFAR10_SIZE)
            if y.ndim != 1 or len(y) != len(data):
                raise ValueError(f"{len(data)} images but {y.size} labels")
        except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
            raise UserError(f"cannot read {path} ({e.__class__.__name__}: {str(e)[:80]}); delete {batches} and run "
                            "again") from None
        keep = np.isin(y, wanted)  # filter batch by batch so all of CIFAR-10 is never held twice
        images.append(data[keep].transpose(0, 2, 3, 1))
        labels.append(y[keep])
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


# ------------------------------------------------------------------------------------------------ image folders
def load_image_folder(folder, image_size):
    """Every readable image below `folder` as RGB, shorter side resized (LANCZOS), centre-cropped: uint8 [N,S,S,3]."""
    paths, skipped = scan_images(folder)  # the same scan as fid.py's: FIFOs, loops and links out are left out
    if not paths:
        raise UserError(f"no images (png, jpg, jpeg, webp, bmp) found in {folder}; pass a folder of images")
    if skipped:
        print(describe_skipped(folder, skipped), file=sys.stderr)
    images, bad = [], []
    for p in paths:
        try:
            images.append(np.asarray(resize_center_crop(load_rgb(p), image_size), dtype=np.uint8))
        except UserError as e:
            bad.append(str(e))
    if not images:
        raise UserError(f"none of the {len(paths)} image files in {folder} could be read (first: {bad[0]})")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image file(s) in {folder}; first: {bad[0]}", file=sys.stderr)
    return np.stack(images)


# ------------------------------------------------------------------------------------------------- entry point
SHAPES_SEED = {"train": 0, "test": 1}  # the rendered sets are fixed, so runs are comparable
SHAPES_TEST_FRACTION = 10             # the test split has a tenth as many scenes as the train split


def load_dataset(data_cfg, split="train", download=True):
    """(images uint8 [N, 3, S, S], labels int64 [N] or None, label names or None) for a DataConfig."""
    if data_cfg.dataset == "cifar":
        if data_cfg.image_size != CIFAR10_SIZE:
            raise UserError(f"CIFAR-10 images are {CIFAR10_SIZE}×{CIFAR10_SIZE}; use --image-size {CIFAR10_SIZE} "
                            "with --dataset cifar")
        wanted = resolve_classes(data_cfg.classes)
        images, labels = load_cifar10(data_cfg.data_dir, split, wanted, download=download)
        relabel = np.full(len(CIFAR10_CLASSES), -1, dtype=np.int64)
        relabel[wanted] = np.arange(len(wanted))  # labels 0..K-1 in the order the classes were asked for
        labels, names = torch.from_numpy(relabel[labels]), [CIFAR10_CLASSES[i] for i in wanted]
    elif data_cfg.dataset == "folder":
        if data_cfg.classes:
            raise UserError("--class only applies to --dataset cifar; a folder dataset has no classes")
        images, labels, names = load_image_folder(data_cfg.data_dir, data_cfg.image_size), None, None
    elif data_cfg.dataset == "shapes":
        from . import shapes  # rendered in-process from a fixed seed: nothing to download

        if data_cfg.classes:
            raise UserError("--class only applies to --dataset cifar; shapes scenes are labelled by --labels")
        count = data_cfg.shapes_count if split == "train" else max(1, data_cfg.shapes_count // SHAPES_TEST_FRACTION)
        images, multi_hot = shapes.make_dataset(split, count, data_cfg.image_size, seed=SHAPES_SEED[split])
        labels, names = torch.from_numpy(multi_hot).float(), list(shapes.VOCAB)
    else:
        raise UserError(f"unknown dataset {data_cfg.dataset!r}; choose cifar, folder or shapes")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, names


FINGERPRINT_IMAGES = 1024  # evenly spaced images hashed into a training set's fingerprint (all of a small set)


def fingerprint(images, labels=None):
    """A cheap identity of a training set, stored in checkpoints so that resuming on other data is refused: its
    size, image shape and a SHA-256 of FINGERPRINT_IMAGES evenly spaced images (uint8 [N, 3, S, S], on the CPU) and
    of all labels. Two different folders with as many images differ in it unless every hashed image is the same."""
    n = images.shape[0]
    picked = torch.linspace(0, n - 1, min(n, FINGERPRINT_IMAGES)).round().long().unique()
    digest = hashlib.sha256(images[picked].contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(labels.contiguous().numpy().tobytes())
    return {"images": n, "shape": list(images.shape[1:]), "sha256": digest.hexdigest()}


def describe_fingerprint(fp):
    """'5000 images of 3×32×32, sha256 1a2b3c4d…' for an error line (anything else, as it is)."""
    try:
        return f"{fp['images']} images of {'×'.join(map(str, fp['shape']))}, sha256 {fp['sha256'][:12]}…"
    except (KeyError, TypeError):
        return repr(fp)[:80]


# ---------------------------------------------------------------------------------------- tensors and sampling
def to_float(x):
    """uint8 [B, 3, H, W] → float32 in [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def random_flip(x, generator):
    """Mirror each image of [B, C, H, W] left-right with probability 1/2, drawn from `generator`."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < FLIP_PROB
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


class BatchSampler:
    """An endless stream of global batches of indices into n images; epoch e is the permutation seeded by (seed, e).

    A batch that runs past the end of an epoch continues into the next one, so every batch is full. Under
    torchrun each rank draws the same global batch and keeps its contiguous shard of batch_size // world_size.
    The state is (epoch, position in it), plus n and seed to catch resuming on other data, so a resumed
    sampler continues the exact same stream.
    """

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        if n < 1:
            raise UserError("the dataset is empty; nothing to train on")
        if batch_size < 1 or batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} must be a positive multiple of the {world_size} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:  # numpy's SeedSequence mixes (seed, epoch) the same way on every platform
            entropy = [self.seed % SEED_MODULUS, epoch]
            self._perm = torch.from_numpy(np.random.default_rng(entropy).permutation(self.n).astype(np.int64))
            self._perm_epoch = epoch
        return self._perm

    def next(self):
        """The next global batch's shard for this rank: LongTensor [batch_size // world_size]."""
        parts, need = [], self.batch_size
        while need:
            take = min(need, self.n - self.pos)
            parts.append(self._permutation(self.epoch)[self.pos:self.pos + take])
            self.pos, need = self.pos + take, need - take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        local = self.batch_size // self.world_size
        return torch.cat(parts)[self.rank * local:(self.rank + 1) * local].clone()

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, d):
        if int(d["n"]) != self.n or int(d["seed"]) != self.seed:
            raise UserError(f"the checkpoint's data order is for {d['n']} images with seed {d['seed']}, but this run "
                            f"has {self.n} images with seed {self.seed}; resume with the same data and seed")
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
