"""Fusion/interpolation figures for docs/fusion.md (run from the repo root; CPU).

    OMP_NUM_THREADS=1 python benchmarks/fusion_figures.py psnr CKPT [n_images=8] [steps=50]
    OMP_NUM_THREADS=1 python benchmarks/fusion_figures.py fid  CKPT [n_fusions=1000] [steps=50] [eta=0] [mix]

`fid` with `mix` also scores the plain pixel average of the same pairs (a baseline: what fusion adds).
"""
import sys, time
import numpy as np, torch
sys.path.insert(0, ".")
from tinyddpm import fusion
from tinyddpm.data import load_cifar10
from tinyddpm.generate import LoadedModel, SamplingOptions
from tinyddpm.imageio import to_pixels
from tinyddpm.samplers import SamplerOptions

CIFAR = ".cache/cifar"
mode, ckpt = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else (8 if mode == "psnr" else 1000)
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 50
eta = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
gen = LoadedModel(ckpt, torch.device("cpu"))
print(f"checkpoint step {gen.step}, T = {gen.diffusion.num_timesteps}", flush=True)
test, _ = load_cifar10(CIFAR, "test", ["cat"], download=False)           # uint8 [1000, 32, 32, 3]
as_float = lambda u8: torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(127.5).sub(1)
t0 = time.time()
if mode == "psnr":
    x = as_float(test[:n])
    ps, opts = [], SamplingOptions(sampler=SamplerOptions("ddim", steps))
    for i in range(0, n, 2):      # pairs (0,1), (2,3), ...: both are endpoints of one interpolation
        frames, _ = fusion.interpolate(gen, x[i], x[i + 1], fusion.InterpolationOptions(frames=2), opts)
        f8 = to_pixels(frames)
        ps += [fusion.psnr(f8[0], test[i]), fusion.psnr(f8[1], test[i + 1])]
    print(f"endpoint PSNR over {n} test cats, {steps} inversion + {steps} decoding steps: mean {np.mean(ps):.2f} "
          f"dB, min {np.min(ps):.2f}, max {np.max(ps):.2f} ({time.time() - t0:.0f}s)", flush=True)
else:
    # Fusion k blends test cats k and (k + 1) mod 1000 (1,000 distinct pairs, each cat once as A and once as B)
    # at λ = 0.5 from t = T/2 with shared noise and seed k, then DDIM back to 0: the same call as --fuse.
    from tinyddpm.inception import load_inception
    from tinyddpm.report import fid, kid, measure_reference
    from tinyddpm.sources import resolve_source
    from tinyddpm.statistics import Measurement, features_from_uint8

    T = gen.diffusion.num_timesteps
    t = fusion.to_index(T // 2, T)
    x = as_float(test)
    pairs = [(k % len(test), (k + 1) % len(test)) for k in range(n)]
    out, B = [], 50
    for k0 in range(0, n, B):
        ks = list(range(k0, min(n, k0 + B)))
        a, b = x[[pairs[k][0] for k in ks]], x[[pairs[k][1] for k in ks]]
        eps, _ = fusion.forward_noise(ks, a.shape[1:])
        x_t = fusion.mix_noised(gen.diffusion, (a, b), torch.full((len(ks),), 0.5), t, (eps, eps))
        opts = SamplingOptions(sampler=SamplerOptions("ddim", steps, eta=eta))
        out.append(gen.sample(ks, None, opts, x_start=x_t, t_start=t).cpu())
        print(f"{ks[-1] + 1}/{n} fusions ({time.time() - t0:.0f}s)", flush=True)
    fused = to_pixels(torch.cat(out))  # uint8 [n, 32, 32, 3]
    np.save("/tmp/fusions.npy", fused)
    mix = ((test[[p[0] for p in pairs]].astype(np.float64) + test[[p[1] for p in pairs]]) / 2).round()
    model = load_inception(device="cpu")
    cache = ".cache/fid"
    ref, train_ref, floor = (measure_reference(resolve_source(spec, CIFAR), model, cache, 50, "cpu")
                             for spec in ("cifar10:cat:test", "cifar10:cat:train:1000", f"cifar10:cat:train:{n}"))
    sides = {"fusions": Measurement.from_features(features_from_uint8(fused, model))}
    if sys.argv[6:] == ["mix"]:
        sides["pixel mix"] = Measurement.from_features(features_from_uint8(mix.astype(np.uint8), model))
    print(f"N = {n}, λ = 0.5, t = {T // 2} of {T}, shared noise, DDIM {steps} steps, η = {eta:g}, step {gen.step}")
    print(f"floor: {n} train cats vs the 1000 test cats: FID {fid(floor, ref):.2f}, KID×1e3 {1e3 * kid(floor, ref)[0]:.2f}")
    for name, side in sides.items():
        print(f"{name}: vs the 1000 test cats (their inputs) FID {fid(side, ref):.2f}, KID×1e3 "
              f"{1e3 * kid(side, ref)[0]:.2f}; vs 1000 train cats (independent) FID {fid(side, train_ref):.2f}")
    print(f"({time.time() - t0:.0f}s)")
