"""Fusion/interpolation figures for docs/fusion.md (run from the repo root; CPU).

    OMP_NUM_THREADS=1 python benchmarks/fusion_figures.py psnr CKPT [n_images=8] [steps=50]
    OMP_NUM_THREADS=1 python benchmarks/fusion_figures.py fid  CKPT [n_fusions=200] [steps=50]
"""
import sys, time
import numpy as np, torch
sys.path.insert(0, ".")
from tinyddpm import fusion
from tinyddpm.data import load_cifar10
from tinyddpm.generate import Generator
from tinyddpm.imageio import to_uint8

CIFAR = ".cache/cifar"
mode, ckpt = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else (8 if mode == "psnr" else 200)
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 50
gen = Generator(ckpt, torch.device("cpu"))
print(f"checkpoint step {gen.step}, T = {gen.diffusion.num_timesteps}", flush=True)
test, _ = load_cifar10(CIFAR, "test", ["cat"], download=False)           # uint8 [1000, 32, 32, 3]
as_float = lambda u8: torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(127.5).sub(1)
t0 = time.time()
if mode == "psnr":
    x = as_float(test[:n])
    for clip in (True, False):
        ps = []
        for i in range(0, n, 2):      # pairs (0,1), (2,3), ...: both are endpoints of one interpolation
            frames, _ = fusion.interpolate(gen, x[i], x[i + 1], 2, steps=steps, clip_x0=clip)
            f8 = to_uint8(frames)
            ps += [fusion.psnr(f8[0], test[i]), fusion.psnr(f8[1], test[i + 1])]
        print(f"clip_x0={clip}: endpoint PSNR over {n} test cats, {steps} inversion + {steps} decoding steps: "
              f"mean {np.mean(ps):.2f} dB, min {np.min(ps):.2f}, max {np.max(ps):.2f} "
              f"({time.time() - t0:.0f}s)", flush=True)
else:
    from tinyddpm.distance import frechet_distance
    from tinyddpm.inception import load_inception
    from tinyddpm.statistics import statistics_from_uint8
    train, _ = load_cifar10(CIFAR, "train", ["cat"], download=False)
    T = gen.diffusion.num_timesteps
    x = as_float(test)
    out, B = [], 50
    for k0 in range(0, n, B):   # fusion k: test cats (2k, 2k+1) mod 1000, seed k, λ = 0.5, t = T/2, DDIM
        ks = list(range(k0, min(n, k0 + B)))
        a = x[[(2 * k) % len(test) for k in ks]]
        b = x[[(2 * k + 1) % len(test) for k in ks]]
        t = fusion.to_index(T // 2, T)
        eps, _ = fusion.forward_noise(ks, a.shape[1:])
        x_t = fusion.mix_noised(gen.diffusion, a, b, torch.full((len(ks),), 0.5), t, eps, eps)
        out.append(gen.sample(ks, None, "ddim", steps, 0.0, 1.0, True, x_start=x_t, t_start=t).cpu())
        print(f"{ks[-1] + 1}/{n} fusions ({time.time() - t0:.0f}s)", flush=True)
    out = torch.cat(out)
    fused = to_uint8(out)
    model = load_inception(device="cpu")
    mu_f, s_f = statistics_from_uint8(fused, model)
    mu_te, s_te = statistics_from_uint8(test, model)
    mu_tr, s_tr = statistics_from_uint8(train[:1000], model)
    mu_tr_n, s_tr_n = statistics_from_uint8(train[:n], model)
    print(f"FID fusions (N={n}, λ=0.5, t={T // 2}, DDIM {steps}) vs 1000 test cats: "
          f"{frechet_distance(mu_f, s_f, mu_te, s_te):.1f}")
    print(f"FID floor: 1000 train cats vs 1000 test cats: {frechet_distance(mu_tr, s_tr, mu_te, s_te):.1f}")
    print(f"FID floor at the fusions' N: {n} train cats vs 1000 test cats: "
          f"{frechet_distance(mu_tr_n, s_tr_n, mu_te, s_te):.1f}")
    print(f"pixel-mix baseline: {n} λ=0.5 pixel averages vs 1000 test cats: ", end="")
    mix = ((test[[(2 * k) % 1000 for k in range(n)]].astype(np.float64) +
            test[[(2 * k + 1) % 1000 for k in range(n)]]) / 2).round().astype(np.uint8)
    mu_m, s_m = statistics_from_uint8(mix, model)
    print(f"{frechet_distance(mu_m, s_m, mu_te, s_te):.1f} ({time.time() - t0:.0f}s)")
