"""Image fusion and interpolation with a trained diffusion model.

Fusion (the report this project grew from). Noise two real images a and b to step t with the forward process,
mix them, and denoise the mixture from t back to 0 with the usual sampler:

    x_t^a = √ᾱ_t·a + √(1−ᾱ_t)·ε_a,   x_t^b = √ᾱ_t·b + √(1−ᾱ_t)·ε_b,   x_t = (1 − λ)·x_t^a + λ·x_t^b

λ is the weight of the SECOND image: λ = 0 is a noised and denoised (a close variation of a), λ = 1 the same for b.
With shared noise (ε_a = ε_b = ε) the mixture is exactly q_sample((1 − λ)·a + λ·b, t, ε): the forward process of
the pixel mix, which the model then pulls back onto the image manifold. With independent noise the mixed noise
(1 − λ)·ε_a + λ·ε_b has variance (1 − λ)² + λ² < 1 (½ at λ = ½); it is divided by √((1 − λ)² + λ²), so the model
is shown exactly the noise level of step t: x_t = q_sample((1 − λ)·a + λ·b, t, ε_mix) in both modes.

Interpolation. Each input is encoded to a latent x_T by deterministic DDIM inversion (η = 0); the two latents are
interpolated spherically (slerp) and every frame is decoded with η = 0 DDIM. Frame 0 and the last frame reproduce
the inputs up to the inversion's discretisation error (their PSNR is printed).

Timestep convention. The user's --t counts paper steps 1 … T (x_t after t noising steps); the code indexes the
schedule 0 … T−1, so --t maps to index t − 1 (--t T is the last, noisiest step).

Shapes: an input image is float [3, S, S] in [−1, 1]; batches are [B, 3, S, S]; files are 8-bit RGB PNGs.
"""
import math
import os

import numpy as np
import torch

from .errors import UserError
from .files import prepare_output_dir
from .generate import DEFAULT_DDIM_STEPS, Progress, cycle
from .imageio import load_rgb, make_grid, resize_center_crop, save_png, to_pixels, to_tensor
from .samplers import ImageNoise, ddim_invert, sample

DEFAULT_LAM = 0.5
DEFAULT_FRAMES = 9
MAX_FRAMES = 1000  # frames of one interpolation: all of them sit in memory and side by side in strip.png
DEFAULT_STEPS = DEFAULT_DDIM_STEPS  # DDIM steps when --steps is not given (sample.py's default)
NOISE_MODES = ("shared", "independent")
# The forward noise of a fusion is drawn from its own stream, so it is not the first draw of the sampler's noise
# for the same seed (which would correlate the noise added at step t with the noise the sampler adds next).
FORWARD_NOISE_STREAM = 0xF0
SLERP_LINEAR_BELOW = 1e-4     # angle (radians) from 0 or π within which sin θ ≈ 0 and slerp needs its guards
SLERP_ANTIPODAL_SEED = 0      # the fixed direction an antipodal slerp turns through
PIXEL_MAX = 255.0             # PSNR on 8-bit images


# ---- inputs and the timestep convention ----------------------------------------------------------------------
def load_image(path, size):
    """Any image file → float [3, size, size] in [−1, 1]: RGB, shorter side resized (LANCZOS), centre-cropped."""
    return to_tensor(resize_center_crop(load_rgb(path), size))


def default_t(num_timesteps):
    """The default --t: half of the chain, T/2 in paper steps (500 of 1000)."""
    return max(1, num_timesteps // 2)


def to_index(t_user, num_timesteps):
    """Paper step t ∈ 1 … T → schedule index t − 1 ∈ 0 … T−1 (a UserError outside that range)."""
    if not 1 <= t_user <= num_timesteps:
        raise UserError(f"--t must be in 1 … {num_timesteps} (this model's T) (got {t_user}); "
                        f"default is T/2 = {default_t(num_timesteps)}")
    return t_user - 1


# ---- fusion ---------------------------------------------------------------------------------------------------
def forward_noise(seeds, shape, noise="shared"):
    """(ε_a, ε_b), each [B, *shape] on the CPU, from per-image generators: the same seed, the same noise.

    Shared noise returns the same tensor twice; independent noise draws ε_b after ε_a from the same generator.
    """
    streams = [int(np.random.SeedSequence([int(s), FORWARD_NOISE_STREAM]).generate_state(1)[0]) for s in seeds]
    gen = ImageNoise(streams, shape, "cpu")
    eps_a = gen.next()
    return eps_a, (eps_a if noise == "shared" else gen.next())


def mix_noised(diffusion, a, b, lam, t, eps_a, eps_b, noise="shared"):
    """q_sample((1 − λ)·a + λ·b, t, ε_mix): [B, 3, S, S], with ε_mix = (1 − λ)·ε_a + λ·ε_b scaled to unit variance.

    a, b [3, S, S] (or [B, 3, S, S]); lam [B]; t a schedule index; eps_a, eps_b [B, 3, S, S]. Shared noise
    (ε_a = ε_b) mixes to ε itself, so this is (1 − λ)·x_t^a + λ·x_t^b exactly; independent noise mixes to variance
    (1 − λ)² + λ², which is divided out so that x_t has the noise level of step t.
    """
    batch = eps_a.shape[0]
    tt = torch.full((batch,), t, dtype=torch.long)
    w = lam.view(-1, 1, 1, 1).to(eps_a.dtype)
    eps = (1.0 - w) * eps_a + w * eps_b
    if noise == "independent":
        eps = eps / torch.sqrt((1.0 - w) ** 2 + w ** 2)
    return diffusion.q_sample(((1.0 - w) * a + w * b).expand_as(eps_a), tt, eps)


@torch.no_grad()
def fuse_rows(gen, a, b, lams, t, seeds, cond=None, noise="shared", batch_size=256, progress=None, **sample_kw):
    """Fusions of a and b ([3, S, S] in [−1, 1]), made lazily: yields (the chunk's seeds, float [k, L, 3, S, S]),
    one row of L = len(lams) fusions per seed, so a caller that writes each chunk holds one chunk in memory.

    gen: a diffusion `LoadedModel`; t: schedule index (0 … T−1); cond: rows cycled over the seeds (generate.cycle:
    seed j gets row j % P) or None; sample_kw: sampler, steps, eta, cfg_scale, clip_x0 as for `LoadedModel.sample`.
    A batch holds whole rows: max(1, batch_size // L) seeds. Image (seed s, λ) draws its forward noise and its
    sampler noise from s alone, so one seed's row differs only in λ, whatever the batch size.
    """
    per_batch = max(1, batch_size // len(lams))
    lam_row = torch.tensor(lams, dtype=torch.float32)
    for i in range(0, len(seeds), per_batch):
        chunk = seeds[i: i + per_batch]
        job_seeds = [s for s in chunk for _ in lams]
        eps_a, eps_b = forward_noise(job_seeds, a.shape, noise)
        x_t = mix_noised(gen.diffusion, a, b, lam_row.repeat(len(chunk)), t, eps_a, eps_b, noise)
        c = cycle(cond, i, i + len(chunk))
        c = None if c is None else c.repeat_interleave(len(lams), dim=0)
        x = gen.sample(job_seeds, c, x_start=x_t, t_start=t, **sample_kw).float().cpu()
        if progress:
            progress((i + len(chunk)) * len(lams), len(seeds) * len(lams))
        yield chunk, x.view(len(chunk), len(lams), *a.shape)


def fuse(gen, a, b, lams, t, seeds, cond=None, noise="shared", batch_size=256, progress=None, **sample_kw):
    """All fusions at once: float [len(seeds), len(lams), 3, S, S] (see fuse_rows)."""
    return torch.cat([x for _, x in fuse_rows(gen, a, b, lams, t, seeds, cond, noise, batch_size, progress,
                                              **sample_kw)])


# ---- interpolation --------------------------------------------------------------------------------------------
def slerp(z0, z1, alpha):
    """Spherical interpolation between two latents of any shape (float64 maths): α = 0 → z0, α = 1 → z1.

    Follows the great circle through z0 and z1 (Shoemake 1985; used for DDIM latents by Song et al. 2021), so a
    midpoint of two Gaussian latents keeps a Gaussian-like norm where a straight line would shrink it by up to √2.
    Guards where sin θ ≈ 0: (nearly) parallel latents or a zero latent take the straight line; (nearly) antipodal
    ones, whose great circle is not unique, turn through a fixed direction orthogonal to z0 with the norm
    interpolated linearly (a straight line would pass through 0, and dividing by sin θ would blow up).
    """
    a, b = z0.double().flatten(), z1.double().flatten()
    na, nb = a.norm(), b.norm()
    cos = (a @ b / (na * nb)).clamp(-1.0, 1.0) if na > 0 and nb > 0 else torch.ones((), dtype=torch.float64)
    theta = torch.arccos(cos)
    if theta < SLERP_LINEAR_BELOW:  # parallel, or a zero latent (no direction to turn from)
        out = (1.0 - alpha) * a + alpha * b
    elif math.pi - theta < SLERP_LINEAR_BELOW and a.numel() > 1:  # antipodal: any great circle through z0 reaches −z0
        ua = a / na
        p = torch.randn(a.shape, generator=torch.Generator().manual_seed(SLERP_ANTIPODAL_SEED), dtype=torch.float64)
        p = p - (p @ ua) * ua
        turn = math.cos(alpha * math.pi) * ua + math.sin(alpha * math.pi) * p / p.norm()
        out = ((1.0 - alpha) * na + alpha * nb) * turn
    else:
        out = (torch.sin((1.0 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)
    return out.view_as(z0).to(z0.dtype)


def _repeat_cond(cond, n):
    return None if cond is None else cond[:1].expand(n, *cond.shape[1:]).contiguous()


@torch.no_grad()
def interpolate(gen, a, b, frames, cond=None, steps=DEFAULT_STEPS, inversion_steps=None, cfg_scale=1.0,
                clip_x0=False, batch_size=256, progress=None, autoguidance=1.0):
    """DDIM-inversion interpolation: (frames float [F, 3, S, S], latents [2, 3, S, S]).

    Both inputs are inverted to x_T with `inversion_steps` (default `steps`) η = 0 steps, the latents slerped at
    α = 0, 1/(F−1), …, 1, and each frame decoded with `steps` η = 0 DDIM steps. Decoding does not clip x0̂ by
    default: the inversion cannot clip, and clipping only one direction breaks the round trip (on CIFAR cats it
    cost 12 dB of endpoint PSNR). Runs in float32 without autocast: the round trip is only as exact as the
    arithmetic. cond: a single condition ([1] or [1, K]) or None. Inversion and decoding use the same model function
    (with `cfg_scale` and `autoguidance`), so the round trip stays exact.
    """
    device = gen.device
    x = torch.stack([a, b]).to(device)
    fn = gen.model_fn(_repeat_cond(cond, 2), cfg_scale, autoguidance)
    latents = ddim_invert(gen.diffusion, fn, x, inversion_steps or steps)
    alphas = np.linspace(0.0, 1.0, frames)
    z = torch.stack([slerp(latents[0], latents[1], float(al)) for al in alphas])
    out = []
    for i in range(0, frames, batch_size):
        zb = z[i: i + batch_size]
        fn = gen.model_fn(_repeat_cond(cond, len(zb)), cfg_scale, autoguidance)
        # η = 0: the seeds draw no noise; they are only there because the sampler takes one per image.
        out.append(sample("ddim", gen.diffusion, fn, tuple(a.shape), [0] * len(zb), device, steps, 0.0, clip_x0,
                          x_start=zb).float().cpu())
        if progress:
            progress(i + len(zb), frames)
    return torch.cat(out), latents.cpu()


def psnr(x_uint8, y_uint8):
    """PSNR in dB between two uint8 images (any equal shape); inf when they are identical."""
    mse = np.mean((x_uint8.astype(np.float64) - y_uint8.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(PIXEL_MAX ** 2 / mse)


def strip(a_uint8, middle_uint8, b_uint8):
    """One row a | middle … | b (uint8 [H, W, 3] each, middle [M, H, W, 3]) as a uint8 image, 2-px white gaps."""
    row = np.concatenate([a_uint8[None], middle_uint8, b_uint8[None]])
    return make_grid(row, ncol=len(row))


# ---- command line (flags added to sample.py) -------------------------------------------------------------------
def add_args(p):
    """Add the fusion/interpolation flags to sample.py's parser."""
    g = p.add_argument_group("fusion and interpolation (docs/fusion.md)")
    g.add_argument("--fuse", nargs="+", metavar="IMAGE", default=None,
                   help="fuse two images A B: noise both to --t, mix (1−λ)·A + λ·B, denoise to 0; writes fused*.png "
                        "and strip*.png (A | fusions | B). --n fusions per λ (default 1), seeds --seed …")
    g.add_argument("--interpolate", nargs="+", metavar="IMAGE", default=None,
                   help="interpolate two images A B: DDIM-invert both to x_T, slerp, decode --frames frames "
                        "(frame_*.png, strip.png); prints the endpoints' reconstruction PSNR")
    g.add_argument("--lam", nargs="+", type=float, default=None,
                   help=f"fusion weight(s) λ ∈ [0, 1] of the SECOND image B: 0 = A, 1 = B (default {DEFAULT_LAM}); "
                        "several λ give one strip per seed")
    g.add_argument("--t", type=int, default=None,
                   help="fusion noise level in paper steps 1 … T (default T/2: 500 for T = 1000); "
                        "schedule index t−1")
    g.add_argument("--noise", choices=NOISE_MODES, default=None,
                   help="fusion noise: shared (default; one ε for both, the mix is the forward process of the "
                        "pixel mix) or independent (one ε each)")
    g.add_argument("--frames", type=int, default=None,
                   help=f"interpolation frames including both ends, ≥ 2 (default {DEFAULT_FRAMES})")
    g.add_argument("--inversion-steps", type=int, default=None,
                   help="DDIM steps of the inversion (default: --steps, which gives the closest round trip)")


FUSE_ONLY = ("lam", "t", "noise")
INTERPOLATE_ONLY = ("frames", "inversion_steps")


def _flags(args, names):
    return [f"--{k.replace('_', '-')}" for k in names if getattr(args, k) is not None]


def check_args(args, gen, opts):
    """Every user mistake of a fusion/interpolation command as one UserError, before any image is read.
    (sample.py has already refused two modes at once, --n with --interpolate, and checked the sampling options.)"""
    mode = "--fuse" if args.fuse else "--interpolate"
    if gen.kind != "ddpm":
        raise UserError(f"{mode} needs a diffusion model; {args.ckpt} is a {gen.kind.upper()} checkpoint")
    paths = args.fuse or args.interpolate
    if len(paths) != 2:
        raise UserError(f"{mode} takes exactly two images A B (got {len(paths)})")
    if args.fuse:
        if _flags(args, INTERPOLATE_ONLY):
            raise UserError(f"{' '.join(_flags(args, INTERPOLATE_ONLY))} only apply to --interpolate")
        for lam in args.lam or ():
            if not 0.0 <= lam <= 1.0:  # also false for NaN
                raise UserError(f"--lam must be in [0, 1] (λ is the weight of the second image) (got {lam})")
        if args.t is not None:
            to_index(args.t, gen.diffusion.num_timesteps)
    else:
        if _flags(args, FUSE_ONLY):
            raise UserError(f"{' '.join(_flags(args, FUSE_ONLY))} only apply to --fuse")
        if args.frames is not None and not 2 <= args.frames <= MAX_FRAMES:
            raise UserError(f"--frames must be between 2 (the two inputs' ends) and {MAX_FRAMES} (got {args.frames})")
        if args.inversion_steps is not None and args.inversion_steps < 1:
            raise UserError(f"--inversion-steps must be at least 1 (got {args.inversion_steps})")
        if args.sampler not in (None, "ddim") or opts.eta > 0 or opts.spacing != "uniform":
            raise UserError("--interpolate inverts and decodes with deterministic DDIM (η = 0, uniform steps); "
                            "drop --sampler / --eta / --spacing")
        if args.classes and len(args.classes) > 1:
            raise UserError("--interpolate takes one --class (both inputs are encoded with it)")


def condition(args, gen):
    """The condition rows cycled over the seeds; a class model needs --class (fusion must not cycle through every
    class)."""
    if gen.labels["kind"] == "class" and not args.classes:
        raise UserError(f"this model is class-conditional; give the inputs' class with --class "
                        f"(one of {', '.join(gen.labels['names'])})")
    return gen.parse_condition(args.classes, args.labels)


def run(args, gen, opts):
    """sample.py's --fuse / --interpolate mode. Returns the exit code."""
    check_args(args, gen, opts)
    a, b = (load_image(p, gen.image_size) for p in (args.fuse or args.interpolate))
    cond = condition(args, gen)
    out = prepare_output_dir(args.out)
    a8, b8 = to_pixels(torch.stack([a, b]))
    if args.fuse:
        return _run_fusion(args, gen, opts, a, b, a8, b8, cond, out)
    return _run_interpolation(args, gen, opts, a, b, a8, b8, cond, out)


def _run_fusion(args, gen, opts, a, b, a8, b8, cond, out):
    """--n fusions per λ (default 1), written seed by seed as they are made."""
    T = gen.diffusion.num_timesteps
    t_user = default_t(T) if args.t is None else args.t
    lams = args.lam or [DEFAULT_LAM]
    noise = args.noise or "shared"
    single = opts.n == 1 and len(lams) == 1
    rows = fuse_rows(gen, a, b, lams, to_index(t_user, T), opts.seeds(), cond, noise, opts.batch_size, Progress(),
                     **opts.sample_kw)
    for seeds, fused in rows:
        for s, row in zip(seeds, fused):
            row = to_pixels(row)  # [L, S, S, 3]
            for lam, img in zip(lams, row):
                save_png(img, os.path.join(out, "fused.png" if single else f"fused_seed{s:06d}_lam{lam:g}.png"))
            save_png(strip(a8, row, b8), os.path.join(out, "strip.png" if single else f"strip_seed{s:06d}.png"))
    print(f"wrote {opts.n * len(lams)} fusion(s) and {opts.n} strip(s) (A | λ = {', '.join(f'{x:g}' for x in lams)} "
          f"| B) to {out}: t = {t_user} of T = {T}, {noise} noise, {opts.sampler} sampler")
    return 0


def _run_interpolation(args, gen, opts, a, b, a8, b8, cond, out):
    frames = args.frames or DEFAULT_FRAMES
    decoded, _ = interpolate(gen, a, b, frames, cond, opts.steps, args.inversion_steps, opts.cfg_scale,
                             clip_x0=False, batch_size=opts.batch_size, progress=Progress(),
                             autoguidance=opts.autoguidance)
    imgs = to_pixels(decoded)
    for k, img in enumerate(imgs):
        save_png(img, os.path.join(out, f"frame_{k:03d}.png"))
    save_png(strip(a8, imgs, b8), os.path.join(out, "strip.png"))
    print(f"wrote {frames} frames and strip.png to {out}; endpoint reconstruction PSNR: "
          f"A {psnr(imgs[0], a8):.2f} dB, B {psnr(imgs[-1], b8):.2f} dB "
          f"(inversion {args.inversion_steps or opts.steps} steps, decoding {opts.steps} steps)")
    return 0
