"""Prepare what travels to an offline GPU machine for benchmarks/gpu_evidence.py: one git-ignored bundle folder.

    python benchmarks/make_gpu_bundle.py                           # → .carry/gpu-evidence/, checks the 64 MiB limit
    python benchmarks/make_gpu_bundle.py --data-dir /work/data     # CIFAR-10 from there instead of ../shared
    python benchmarks/make_gpu_bundle.py --no-wheels               # no pip download (diffusers/pytorch-fid skipped)

The GPU machine has Python 3.12 and torch but no network, and only the repository (≤ 64 MiB, the bundle included)
is copied there. The bundle holds:

  cats.zip                 the 5,000 train + 1,000 test CIFAR-10 cats, one file each, named in the order tinyddpm's
                           loader reads them, and the SHA-256 of each split's pixels (checked after decoding). Each
                           cat is the JPEG file of ../shared's export that decodes to exactly its pixels (CIFAR-10
                           here is built from that export), else a PNG (lossless, larger).
  inception_fid_fp16.pth   the FID Inception weights in torchvision layout, rounded to float16: the float32 file
                           is over the limit by itself. Ours and pytorch-fid both load this one file there.
  wheels/                  diffusers and pytorch-fid plus the pure-Python needs the GPU image lacks (pinned below).

gpu_evidence.py unpacks cats.zip into a cats-only cifar-10-batches-py/ that train.py and sample.py read unchanged.
"""
import argparse
import hashlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from tinyddpm.data import CIFAR10_CLASSES, CIFAR10_FOLDER, CIFAR10_SPLITS, load_cifar10  # noqa: E402
from tinyddpm.errors import UserError, run_cli  # noqa: E402
from tinyddpm.files import atomic_write_bytes  # noqa: E402

DEFAULT_BUNDLE = os.path.join(ROOT, ".carry", "gpu-evidence")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
CATS, WEIGHTS, WHEELS, CHECKSUMS = "cats.zip", "inception_fid_fp16.pth", "wheels", "sha256.json"
CLASS = "cat"
TRAIN_CATS, TEST_CATS = 5000, 1000  # all cats of each split
TRAVEL_LIMIT = 64 * 2 ** 20  # bytes: the device tool copies the working tree plus carried paths up to this
MB = 1e6
# Pinned to the versions checked against the GPU image's packages (huggingface-hub, safetensors, zipp, regex,
# requests, filelock, pillow, numpy, scipy and a torchvision matching its torch are there already; these are not).
WHEEL_PINS = ("diffusers==0.42.1", "importlib-metadata==10.2.0", "lazy-importer==0.1.0", "pytorch-fid==0.3.0")
WHEEL_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--no-deps"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_BUNDLE, help="bundle folder (default .carry/gpu-evidence, git-ignored)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py/ (default: .cache/cifar, built from ../shared)")
    p.add_argument("--jpeg-zip", default=os.path.join(SHARED_DATA, "cifar10-jpeg.zip"),
                   help="the JPEG export CIFAR-10 was built from (../shared); cats travel as these files")
    p.add_argument("--weights", default=None, help="FID Inception weights (default: found as fid.py finds them)")
    p.add_argument("--no-wheels", action="store_true", help="do not download wheels (keeps any already there)")
    return p


# ------------------------------------------------------------------------------------------------------- cats
def pixels_sha256(images):
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def decode(data):
    """Image file bytes → uint8 [H, W, 3], as ../shared/data/make_cifar10.py decodes them (PIL, RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def encode(img, fmt):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def pack_cats(path, splits, jpegs):
    """cats.zip from splits {name: uint8 [N, H, W, 3]}: image i of a split is the file of jpegs[name] (any order)
    that decodes to exactly it, else a PNG. Returns {"jpeg": count, "png": count}."""
    counts = {"jpeg": 0, "png": 0}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # JPEG and PNG files are compressed already
        for name, images in splits.items():
            by_pixels = {decode(data).tobytes(): data for data in jpegs.get(name, ())}
            for i, img in enumerate(images):
                data = by_pixels.get(np.ascontiguousarray(img).tobytes())
                ext = "jpeg" if data else "png"
                counts[ext] += 1
                z.writestr(f"{name}/{i:05d}.{ext}", data or encode(img, "PNG"))
        z.writestr(CHECKSUMS, json.dumps({name: pixels_sha256(images) for name, images in splits.items()}))
    atomic_write_bytes(path, buf.getvalue())
    return counts


def unpack_cats(path):
    """cats.zip → ({split: uint8 [N, H, W, 3]}, {split: the pixels are the packed ones (SHA-256)})."""
    with zipfile.ZipFile(path) as z:
        checksums = json.loads(z.read(CHECKSUMS))
        names = sorted(n for n in z.namelist() if n != CHECKSUMS)
        splits = {s: np.stack([decode(z.read(n)) for n in names if n.startswith(s + "/")]) for s in checksums}
    return splits, {s: pixels_sha256(images) == checksums[s] for s, images in splits.items()}


def write_cifar_layout(root, train, test, class_name=CLASS):
    """root/cifar-10-batches-py/ holding only these images (uint8 [N, 32, 32, 3]), all labelled `class_name`, with
    the official file names and keys (protocol-4 pickles, which need no _codecs global), so that
    tinyddpm.data.load_cifar10(root, split, [class_name]) returns them in this order."""
    folder = os.path.join(root, CIFAR10_FOLDER)
    os.makedirs(folder, exist_ok=True)
    label = CIFAR10_CLASSES.index(class_name)
    parts = dict(zip(CIFAR10_SPLITS["train"], np.array_split(train, len(CIFAR10_SPLITS["train"]))))
    parts["test_batch"] = test
    for name, images in parts.items():
        planes = images.transpose(0, 3, 1, 2)  # R, G, B planes, each row by row; a batch may be empty
        rows = np.ascontiguousarray(planes.reshape(len(images), np.prod(planes.shape[1:], dtype=int)))
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rows, "labels": [label] * len(images)}, f, protocol=4)
    return root


def default_data_dir():
    cache = os.path.join(ROOT, ".cache", "cifar")  # where tests/conftest.py builds CIFAR-10 from ../shared
    if not os.path.isfile(os.path.join(cache, CIFAR10_FOLDER, "test_batch")):
        raise UserError(f"no CIFAR-10 in {cache}; build it (python {os.path.join(SHARED_DATA, 'make_cifar10.py')} "
                        f"{cache}) or pass --data-dir with cifar-10-batches-py/ in it")
    return cache


def make_cats(out, data_dir, jpeg_zip):
    """cats.zip from CIFAR-10 in data_dir; returns how many cats travel as JPEG and as PNG files."""
    splits = {s: load_cifar10(data_dir, s, [CLASS], download=False)[0] for s in ("train", "test")}
    for s, n in (("train", TRAIN_CATS), ("test", TEST_CATS)):
        if len(splits[s]) != n:
            raise UserError(f"{data_dir} has {len(splits[s])} {s} cats, expected {n}; pass a complete CIFAR-10")
    jpegs = {}
    if os.path.isfile(jpeg_zip):
        with zipfile.ZipFile(jpeg_zip) as z:
            jpegs = {s: [z.read(n) for n in z.namelist() if n.startswith(f"{s}/{CLASS}/") and n.endswith(".jpg")]
                     for s in splits}
    return pack_cats(os.path.join(out, CATS), splits, jpegs)


# ---------------------------------------------------------------------------------------------- weights, wheels
def make_weights(out, weights=None):
    """The FID Inception weights (found as fid.py finds them) as a float16 torchvision-layout file in `out`."""
    from tinyddpm.files import atomic_torch_save
    from tinyddpm.inception import find_weights, read_weights

    path, how = find_weights(weights, download=False)
    state, flavour = read_weights(path)
    if flavour != "fid":
        raise UserError(f"{path} is the {flavour} Inception; the bundle needs the FID weights (docs/fid.md)")
    atomic_torch_save({k: v.half() if v.is_floating_point() else v for k, v in state.items()
                       if not k.endswith("num_batches_tracked")}, os.path.join(out, WEIGHTS))
    return f"{path} ({how}), float16"


def download_wheels(folder):
    os.makedirs(folder, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", folder, *WHEEL_PLATFORM, *WHEEL_PINS]
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"pip download of {', '.join(WHEEL_PINS)} failed; check the network, or pass --no-wheels")


def install_wheels(folder, site):
    """On the GPU machine: pip install the bundle's wheels into `site` (no network, no dependency resolution) when
    diffusers or pytorch-fid is missing, and put `site` on sys.path and PYTHONPATH (for pytorch-fid's subprocess).
    Returns what happened, in words."""
    wheels = sorted(os.path.join(folder, w) for w in os.listdir(folder) if w.endswith(".whl")) \
        if os.path.isdir(folder) else []
    if not wheels or all(importlib.util.find_spec(m) for m in ("diffusers", "pytorch_fid")):
        return "nothing installed" + ("" if wheels else " (no wheels in the bundle)")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", site, *wheels]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return f"pip install failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (site, os.environ.get("PYTHONPATH"))))
    importlib.invalidate_caches()
    return f"installed {', '.join(os.path.basename(w) for w in wheels)}"


def make_toy_bundle(folder, n_train=4, n_test=4):
    """gpu_evidence.py --smoke: a few smooth random 'cats' (4×4 colour blocks) packed as the real ones, their JPEG
    files as the export, and the FID weights found here rounded to float16. Returns which weights."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (n_train + n_test, 4, 4, 3), dtype=np.uint8).repeat(8, axis=1).repeat(8, axis=2)
    files = [encode(img, "JPEG") for img in blocks]
    images = np.stack([decode(f) for f in files])
    pack_cats(os.path.join(folder, CATS), dict(train=images[:n_train], test=images[n_train:]),
              dict(train=files[:n_train], test=files[n_train:]))
    return make_weights(folder)


# ------------------------------------------------------------------------------------------------------- size
def check_size(bundle, root=ROOT, limit=TRAVEL_LIMIT):
    """(repo bytes, bundle bytes per file); UserError when both together exceed the limit. The repository counts
    as the device tool copies it: tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout
    paths = [os.path.join(root, p) for p in listed.decode().split("\0") if p]
    repo = sum(os.path.getsize(p) for p in paths if os.path.isfile(p) and not os.path.islink(p))
    files = {os.path.relpath(os.path.join(d, f), bundle): os.path.getsize(os.path.join(d, f))
             for d, _, names in os.walk(bundle) for f in names}
    total = repo + sum(files.values())
    print(f"travels: repository {repo / MB:.1f} MB + bundle {sum(files.values()) / MB:.1f} MB = {total / MB:.1f} MB"
          f" of {limit / MB:.1f} MB ({limit / 2 ** 20:g} MiB): " + ", ".join(f"{k} {v / MB:.2f}" for k, v in files.items()))
    if total > limit:
        raise UserError(f"repository + bundle is {total / MB:.1f} MB, over the {limit / MB:.1f} MB the GPU machine "
                        "receives; drop the wheels, or remove large untracked files from the repository")
    return repo, files


def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder")
    os.makedirs(args.out, exist_ok=True)
    print(f"cats: {make_cats(args.out, args.data_dir or default_data_dir(), args.jpeg_zip)}; weights: "
          f"{make_weights(args.out, args.weights)}")
    if not args.no_wheels:
        download_wheels(os.path.join(args.out, WHEELS))
    check_size(args.out)
    print(f"bundle ready in {args.out}; on the GPU machine run the command in docs/gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
