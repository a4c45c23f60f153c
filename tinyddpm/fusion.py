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
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from .checks import check_values
from .diffusion import Denoiser
from .errors import UserError
from .generate import cycle
from .imageio import load_rgb, make_grid, resize_center_crop, to_tensor
from .samplers import ImageNoise, ddim, ddim_invert, levels

DEFAULT_LAM = 0.5
DEFAULT_FRAMES = 9
MAX_FRAMES = 1000  # frames of one interpolation: all of them sit in memory and side by side in strip.png
NOISE_MODES = ("shared", "independent")
# The forward noise of a fusion is drawn from its own stream, so it is not the first draw of the sampler's noise
# for the same seed (which would correlate the noise added at step t with the noise the sampler adds next).
FORWARD_NOISE_STREAM = 0xF0
SLERP_LINEAR_BELOW = 1e-4     # angle (radians) from 0 or π within which sin θ ≈ 0 and slerp needs its guards
SLERP_ANTIPODAL_SEED = 0      # the fixed direction an antipodal slerp turns through
PIXEL_MAX = 255.0             # PSNR on 8-bit images


@dataclass(frozen=True)
class FusionOptions:
    """What to fuse: the weights λ of the second image, the noise level (paper step t, default T/2), the noise."""
    lams: tuple = field(default=(DEFAULT_LAM,), metadata=dict(flag="--lam", type=float, min=0.0, max=1.0,
                                                             min_items=1, help="weights λ of the SECOND image"))
    t: Optional[int] = field(default=None, metadata=dict(min=1, help="noise level in paper steps 1 … T"))
    noise: str = field(default="shared", metadata=dict(choices=NOISE_MODES, help="one ε for both, or one each"))

    def check(self, num_timesteps):
        if type(self.t) is int:  # any --t out of range (0, or huge) gets the line naming this model's 1 … T
            to_index(self.t, num_timesteps)
        check_values(self)
        to_index(self.step(num_timesteps), num_timesteps)
        return self

    def step(self, num_timesteps):
        """The paper step t (1 … T) to noise to: --t, or half of the chain."""
        return default_t(num_timesteps) if self.t is None else self.t


@dataclass(frozen=True)
class InterpolationOptions:
    """How to interpolate: frames including both ends, and the DDIM steps of the inversion (default: decoding's)."""
    frames: int = field(default=DEFAULT_FRAMES, metadata=dict(min=2, max=MAX_FRAMES,
                                                              help="frames including both ends"))
    inversion_steps: Optional[int] = field(default=None, metadata=dict(min=1, help="DDIM steps of the inversion"))

    def check(self):
        check_values(self)
        return self


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


def mix_noised(diffusion, images, lam, t, noises, noise="shared"):
    """q_sample((1 − λ)·a + λ·b, t, ε_mix): [B, 3, S, S], with ε_mix = (1 − λ)·ε_a + λ·ε_b scaled to unit variance.

    images: (a, b), each [3, S, S] (or [B, 3, S, S]); lam [B]; t a schedule index; noises: (ε_a, ε_b), each
    [B, 3, S, S]. Shared noise (ε_a = ε_b) mixes to ε itself, so this is (1 − λ)·x_t^a + λ·x_t^b exactly;
    independent noise mixes to variance (1 − λ)² + λ², which is divided out so that x_t has the noise level of step t.
    """
    (a, b), (eps_a, eps_b) = images, noises
    batch = eps_a.shape[0]
    tt = torch.full((batch,), t, dtype=torch.long)
    w = lam.view(-1, 1, 1, 1).to(eps_a.dtype)
    eps = (1.0 - w) * eps_a + w * eps_b
    if noise == "independent":
        eps = eps / torch.sqrt((1.0 - w) ** 2 + w ** 2)
    return diffusion.q_sample(((1.0 - w) * a + w * b).expand_as(eps_a), tt, eps)


@torch.no_grad()
def fuse_rows(loaded, a, b, fusion, options, cond=None, callback=None):
    """Fusions of a and b ([3, S, S] in [−1, 1]), made lazily: yields (the chunk's seeds, float [k, L, 3, S, S]),
    one row of L = len(fusion.lams) fusions per seed of options.seeds(), so a caller that writes each chunk holds
    one chunk in memory.

    loaded: a diffusion generate.LoadedModel; fusion: FusionOptions; options: generate.SamplingOptions (the sampler,
    guidance, seeds and batch); cond: rows cycled over the seeds (generate.cycle: seed j gets row j % P) or None.
    A batch holds whole rows: max(1, batch_size // L) seeds. Image (seed s, λ) draws its forward noise and its
    sampler noise from s alone, so one seed's row differs only in λ, whatever the batch size.
    """
    lams, seeds = fusion.lams, options.seeds()
    t = to_index(fusion.step(loaded.diffusion.num_timesteps), loaded.diffusion.num_timesteps)
    per_batch = max(1, options.batch_size // len(lams))
    lam_row = torch.tensor(lams, dtype=torch.float32)
    for i in range(0, len(seeds), per_batch):
        chunk = seeds[i: i + per_batch]
        job_seeds = [s for s in chunk for _ in lams]
        eps_a, eps_b = forward_noise(job_seeds, a.shape, fusion.noise)
        x_t = mix_noised(loaded.diffusion, (a, b), lam_row.repeat(len(chunk)), t, (eps_a, eps_b), fusion.noise)
        c = cycle(cond, i, i + len(chunk))
        c = None if c is None else c.repeat_interleave(len(lams), dim=0)
        x = loaded.sample(job_seeds, c, options, x_start=x_t, t_start=t).float().cpu()
        if callback:
            callback((i + len(chunk)) * len(lams), len(seeds) * len(lams))
        yield chunk, x.view(len(chunk), len(lams), *a.shape)


def fuse(loaded, a, b, fusion, options, cond=None):
    """All fusions at once: float [len(seeds), len(lams), 3, S, S] (see fuse_rows)."""
    return torch.cat([x for _, x in fuse_rows(loaded, a, b, fusion, options, cond)])


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
def interpolate(loaded, a, b, interpolation, options, cond=None, callback=None):
    """DDIM-inversion interpolation: (frames float [F, 3, S, S], latents [2, 3, S, S]).

    Both inputs are inverted to x_T with `interpolation.inversion_steps` (default the decoder's) η = 0 steps, the
    latents slerped at α = 0, 1/(F−1), …, 1, and each frame decoded by options.sampler (deterministic DDIM).
    Neither clips x0̂: the inversion cannot clip, and clipping only one direction breaks the round trip (on CIFAR
    cats it cost 12 dB of endpoint PSNR). Runs in float32 without autocast: the
    round trip is only as exact as the arithmetic. cond: a single condition ([1] or [1, K]) or None. Inversion and
    decoding use the same network function (with options' guidance), so the round trip stays exact.
    """
    diffusion, frames = loaded.diffusion, interpolation.frames
    decoder = replace(options.sampler, clip_x0=False)
    inversion = replace(decoder, steps=interpolation.inversion_steps or decoder.calls())
    fn = loaded.network_fn(_repeat_cond(cond, 2), options.guidance_scale, options.autoguidance,
                           options.guidance_interval)
    denoise = Denoiser(diffusion, fn, clip_x0=False)
    latents = ddim_invert(denoise, torch.stack([a, b]).to(loaded.device), levels(inversion, diffusion))
    z = torch.stack([slerp(latents[0], latents[1], float(al)) for al in np.linspace(0.0, 1.0, frames)])
    out = []
    for i in range(0, frames, options.batch_size):
        zb = z[i: i + options.batch_size]
        fn = loaded.network_fn(_repeat_cond(cond, len(zb)), options.guidance_scale, options.autoguidance,
                               options.guidance_interval)
        denoise = Denoiser(diffusion, fn, clip_x0=False)
        # η = 0: the noise source is never drawn from; the sampler takes one all the same.
        noise = ImageNoise([0] * len(zb), a.shape, loaded.device)
        out.append(ddim(denoise, zb, levels(decoder, diffusion), noise).float().cpu())
        if not torch.isfinite(out[-1]).all():  # as LoadedModel.sample: never a NaN or inf image
            raise UserError(f"interpolation gave NaN or inf (frames {i} … {i + len(zb) - 1}), so nothing of it was "
                            "written: lower --cfg-scale, or use another checkpoint")
        if callback:
            callback(i + len(zb), frames)
    return torch.cat(out), latents.cpu()


def psnr(x_uint8, y_uint8):
    """PSNR in dB between two uint8 images (any equal shape); inf when they are identical."""
    mse = np.mean((x_uint8.astype(np.float64) - y_uint8.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(PIXEL_MAX ** 2 / mse)


def strip(a_uint8, middle_uint8, b_uint8):
    """One row a | middle … | b (uint8 [H, W, 3] each, middle [M, H, W, 3]) as a uint8 image, 2-px white gaps."""
    row = np.concatenate([a_uint8[None], middle_uint8, b_uint8[None]])
    return make_grid(row, ncol=len(row))
