"""DCGAN (Radford, Metz & Chintala 2015): the generator, the discriminator and one training step.

Architecture, for any power-of-two image size S ≥ 16 (the paper's rules):
  G: z [B, z_dim] → 4×4 by a transposed convolution, then a 4×4 stride-2 transposed convolution per doubling up to
     S; BatchNorm + ReLU after every layer but the last, tanh on the output. Width at resolution r is
     g_channels·S/(2r) (64 px: 512→256→128→64→3, as in the paper).
  D: the mirror image: 4×4 stride-2 convolutions from S down to 4×4, LeakyReLU 0.2, BatchNorm on every layer but the
     first; a final 4×4 valid convolution gives one logit. No pooling and no dense hidden layers in either network.
  Weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), biases 0 (`init_weights`).

Training: Adam (lr 2e-4, β = (beta1, 0.999)); D minimises BCE-with-logits on real/fake with optional one- or
two-sided label smoothing (Salimans et al. 2016); G minimises the non-saturating loss BCE(D(G(z)), 1). Instance noise
(Sønderby et al. 2016) is added to every image D sees — real and fake, in both updates — with a std that falls
linearly to 0. The EMA of G's weights used for sampling lives in tinyddpm/ema.py and is the training loop's job.

Conditioning (cond_kind "class": an int64 index [B]; "multilabel": a float label set [B, num_cond], e.g. the 24
shape attributes). We chose:
  G: the label is embedded (class: nn.Embedding, multi-hot: nn.Linear without bias, so the empty set embeds to 0)
     to COND_EMBED_DIM dims and concatenated to z — the simplest conditioning that keeps G all-convolutional.
  D: projection (Miyato & Koyama 2018): logit = w·φ(x) + <embed(y), φ(x)>, where φ(x) is D's last feature map
     [B, C, 4, 4] flattened — exactly what the final 4×4 convolution (the "w·φ" term) reads. Projection beats
     concatenating the label to D's input: D must explain the image *given* y instead of learning to ignore y.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

MIN_SIZE = 16  # the smallest image the 4×4 → S ladder makes sense for
BASE = 4  # spatial size where G starts and D ends
KERNEL = 4  # all (transposed) convolutions are 4×4, stride 2, padding 1: exact doubling/halving
LEAKY_SLOPE = 0.2
INIT_STD = 0.02
COND_EMBED_DIM = 64  # size of the label embedding concatenated to z in G
ADAM_BETA2 = 0.999
REAL_TARGET = {"none": 1.0, "one": 0.9, "two": 0.9}
FAKE_TARGET = {"none": 0.0, "one": 0.0, "two": 0.1}
COND_KINDS = ("none", "class", "multilabel")


def num_doublings(image_size):
    """log2(S/4): how many stride-2 layers G and D need; a UserError unless S is a power of two ≥ 16."""
    if image_size < MIN_SIZE or image_size & (image_size - 1):
        raise UserError(f"DCGAN needs --image-size a power of two ≥ {MIN_SIZE}, got {image_size}; "
                        "use 16, 32, 64, 128, ...")
    return int(math.log2(image_size // BASE))


def _label_embedding(cond_kind, num_cond, dim):
    """Class index → nn.Embedding; multi-hot set → nn.Linear (no bias: the empty set embeds to 0); none → None."""
    if cond_kind not in COND_KINDS:  # same kinds and messages as tinyddpm/unet.py
        raise UserError(f"unknown condition kind {cond_kind!r}; choose one of {', '.join(COND_KINDS)}")
    if cond_kind == "none":
        return None
    if num_cond < 1:
        raise UserError(f"a {cond_kind!r}-conditional model needs num_cond ≥ 1 (got {num_cond})")
    return nn.Embedding(num_cond, dim) if cond_kind == "class" else nn.Linear(num_cond, dim, bias=False)


def _embed(embedding, cond):
    if (embedding is None) != (cond is None):
        raise ValueError("pass cond exactly when the network is conditional")
    return embedding(cond if isinstance(embedding, nn.Embedding) else cond.float())


def init_weights(module):
    """DCGAN init, for `net.apply(init_weights)`: conv/linear/embedding ~ N(0, 0.02), BatchNorm weight ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, gan_cfg, image_size, channels=3, cond_kind="none", num_cond=0):
        super().__init__()
        n = num_doublings(image_size)
        self.z_dim = gan_cfg.z_dim
        self.embed = _label_embedding(cond_kind, num_cond, COND_EMBED_DIM)
        width = [gan_cfg.g_channels * image_size // (2 * BASE * 2 ** i) for i in range(n)]  # at 4, 8, ..., S/2
        z_in = self.z_dim + (COND_EMBED_DIM if self.embed is not None else 0)
        # [B, z_in, 1, 1] → [B, width[0], 4, 4]
        layers = [nn.ConvTranspose2d(z_in, width[0], BASE, 1, 0, bias=False), nn.BatchNorm2d(width[0]), nn.ReLU(True)]
        for i in range(n - 1):  # each doubles the resolution, halves the width
            layers += [nn.ConvTranspose2d(width[i], width[i + 1], KERNEL, 2, 1, bias=False),
                       nn.BatchNorm2d(width[i + 1]), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width[-1], channels, KERNEL, 2, 1, bias=False), nn.Tanh()]  # → [B, C, S, S]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z, cond=None):
        """z [B, z_dim] (+ cond [B] or [B, num_cond]) → images [B, C, S, S] in [-1, 1]."""
        h = z if self.embed is None and cond is None else torch.cat([z, _embed(self.embed, cond)], dim=1)
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, gan_cfg, image_size, channels=3, cond_kind="none", num_cond=0):
        super().__init__()
        n = num_doublings(image_size)
        width = [gan_cfg.d_channels * 2 ** i for i in range(n)]  # at S/2, S/4, ..., 4
        layers = [nn.Conv2d(channels, width[0], KERNEL, 2, 1, bias=False), nn.LeakyReLU(LEAKY_SLOPE, True)]  # no BN
        for i in range(n - 1):
            layers += [nn.Conv2d(width[i], width[i + 1], KERNEL, 2, 1, bias=False),
                       nn.BatchNorm2d(width[i + 1]), nn.LeakyReLU(LEAKY_SLOPE, True)]
        self.features = nn.Sequential(*layers)  # [B, C, S, S] → φ(x) [B, width[-1], 4, 4]
        self.out = nn.Conv2d(width[-1], 1, BASE, 1, 0, bias=False)  # the w·φ(x) term: [B, 1, 1, 1]
        self.embed = _label_embedding(cond_kind, num_cond, width[-1] * BASE * BASE)  # for <embed(y), φ(x)>
        self.apply(init_weights)

    def forward(self, x, cond=None):
        """x [B, C, S, S] (+ cond) → logits [B] (positive: "real")."""
        phi = self.features(x)
        logits = self.out(phi).flatten()
        if self.embed is not None or cond is not None:
            logits = logits + (_embed(self.embed, cond) * phi.flatten(1)).sum(dim=1)
        return logits


def make_optimizers(G, D, gan_cfg, lr=2e-4):
    """Adam for each network with the DCGAN betas (beta1, 0.999)."""
    betas = (gan_cfg.beta1, ADAM_BETA2)
    return torch.optim.Adam(G.parameters(), lr, betas=betas), torch.optim.Adam(D.parameters(), lr, betas=betas)


def instance_noise_std(gan_cfg, step, total_steps):
    """gan_cfg.instance_noise at step 0, falling linearly to 0 at noise_anneal_steps (0: total_steps // 2)."""
    anneal = gan_cfg.noise_anneal_steps or total_steps // 2
    if anneal <= 0:
        return 0.0
    return gan_cfg.instance_noise * max(0.0, 1.0 - step / anneal)


def discriminator_loss(d_real_logits, d_fake_logits, gan_cfg):
    """BCE(D(x), real target) + BCE(D(G(z)), fake target); targets 1/0, 0.9/0 ("one") or 0.9/0.1 ("two")."""
    real_t = torch.full_like(d_real_logits, REAL_TARGET[gan_cfg.label_smoothing])
    fake_t = torch.full_like(d_fake_logits, FAKE_TARGET[gan_cfg.label_smoothing])
    return (F.binary_cross_entropy_with_logits(d_real_logits, real_t)
            + F.binary_cross_entropy_with_logits(d_fake_logits, fake_t))


def generator_loss(d_fake_logits):
    """Non-saturating: maximise log D(G(z)) (strong gradients while D still wins), i.e. BCE with target 1."""
    return F.binary_cross_entropy_with_logits(d_fake_logits, torch.ones_like(d_fake_logits))


def _noisy(x, std, generator):
    if std == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return x + std * noise.to(x.device)


@dataclasses.dataclass
class GAN:
    """The two networks and their optimizers, which every training step updates together."""
    G: Generator
    D: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


def gan_train_step(gan, real, cond, gan_cfg, step, total_steps, generator):
    """One D update then one G update on the same z. real [B, C, S, S] in [-1, 1]; all randomness from `generator`.

    Real and fake go through D as separate batches (the DCGAN paper's BatchNorm advice). Returns detached tensors
    (no .item(), so the caller decides when to synchronise).
    """
    G, D, opt_g, opt_d = gan.G, gan.D, gan.opt_g, gan.opt_d
    std = instance_noise_std(gan_cfg, step, total_steps)
    z = torch.randn(real.shape[0], G.z_dim, generator=generator, device=generator.device).to(real.device)
    fake = G(z, cond)

    # D: push D(x) up and D(G(z)) down; fake is detached so G gets no gradient here.
    d_real = D(_noisy(real, std, generator), cond)
    d_fake = D(_noisy(fake.detach(), std, generator), cond)
    d_loss = discriminator_loss(d_real, d_fake, gan_cfg)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    # G: through the freshly updated D; D's weights are frozen so no gradient is computed for them.
    D.requires_grad_(False)
    g_loss = generator_loss(D(_noisy(fake, std, generator), cond))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    D.requires_grad_(True)

    return dict(d_loss=d_loss.detach(), g_loss=g_loss.detach(),
                d_real=torch.sigmoid(d_real.detach()).mean(), d_fake=torch.sigmoid(d_fake.detach()).mean())


def sample_z(n_or_seeds, z_dim, device="cpu"):
    """Latents [N, z_dim]: image i's z comes from its own seed (seeds = range(n) for an int), drawn on the CPU,
    so it depends neither on the batch size nor on the device."""
    seeds = range(n_or_seeds) if isinstance(n_or_seeds, int) else n_or_seeds
    zs = [torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(zs).to(device) if zs else torch.empty(0, z_dim, device=device)
