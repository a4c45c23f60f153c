"""The DDPM U-Net (Ho et al. 2020) with the options of Nichol & Dhariwal (2021).

    x [B,C,H,W] ─conv─┬─ Res(+Attn) ×N ─ Down ─ … ─ Mid (Res, Attn, Res) ─ … ─ Up ─ Res(+Attn) ×(N+1) ─ out ─►
                      └─ every down-path output is concatenated onto one up-path block (skip connections) ─┘
    t [B] ─ sinusoid ─ MLP ─(+ condition embedding)─► added (or scale/shift) in every ResBlock
    label set ─ one token per label (+ null) ─► attended over by every attention block (--cross-attention) and
                                                every block at --cross-attn-resolutions

The `ddpm-cifar` preset (128 channels, mults (1, 2, 2, 2), 2 blocks, attention at 16 px) has 35.7 M parameters:
the CIFAR-10 network of the paper, and the same as diffusers' UNet2DModel at block_out_channels (128, 256, 256, 256).
The middle block always has attention, as in the paper, improved-diffusion and diffusers; `attn_resolutions` adds it
to the down/up levels whose feature maps have that size.

Initialisation follows improved-diffusion: the last conv of every residual branch, every attention output projection
and the final conv start at zero, so each block starts as the identity and the untrained model outputs exactly 0.

GPU notes: no data-dependent Python control flow in `forward` (torch.compile traces it without graph breaks); the
condition is dropped with `torch.where`, not by indexing; attention works on [B, HW, C] tokens, which is a free view
of a channels_last tensor, and uses F.scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).
GroupNorm + SiLU is fused by torch.compile; eager mode uses the plain ops, SiLU and the residual adds in place.
CPU: the weights are channels_last (oneDNN's fastest layout here; see docs/speed.md).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .constants import COND_KINDS
from .errors import UserError

NORM_GROUPS = 32  # GroupNorm groups, as in the paper (at ≥ 128 channels)
# At least this many channels per group. With one channel per group GroupNorm becomes InstanceNorm and removes each
# channel's spatial mean, so a narrow model cannot carry an image's overall colour to its output: samples of the
# 32-channel `tiny` preset came out with saturated, wrong global colours (magenta floors in the shapes data).
MIN_CHANNELS_PER_GROUP = 4
TIME_EMBED_MULT = 4  # time-embedding width = 4 × base channels
MAX_PERIOD = 10_000  # longest wavelength of the sinusoidal timestep embedding (as in Transformers)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of (integer or float) timesteps: t [B] → [B, dim] = [cos(t·f), sin(t·f)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]; float32 even under autocast: t goes up to ~1000
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_(module):
    """Zero a layer's weights and bias, so a residual branch starts as 0 (improved-diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def norm_groups(channels):
    return max(1, min(NORM_GROUPS, channels // MIN_CHANNELS_PER_GROUP))


def norm(channels):
    return nn.GroupNorm(norm_groups(channels), channels)


def up_block_inputs(cfg):
    """The input width of every up-path block, in order: the width below it plus the down-path output (skip) it is
    concatenated with. The skips are the stem's output, each down block's and each Downsample's, used last-first."""
    widths = [cfg.base_channels * m for m in cfg.channel_mults]
    skips = [cfg.base_channels]
    for i, width in enumerate(widths):
        skips += [width] * (cfg.num_res_blocks + (i < len(widths) - 1))
    inputs, w = [], widths[-1]
    for i in reversed(range(len(widths))):
        for _ in range(cfg.num_res_blocks + 1):
            inputs.append(w + skips.pop())
            w = widths[i]
    return inputs


def check_config(cfg, image_size: int):
    """Every shape rule of the network, checked before anything is built: one UserError naming the flags.

    GroupNorm must split each width it normalises evenly: the level widths and the concatenated widths the up path
    sees: --base-channels 36 --channel-mults 1 2 has levels of 36 and 72 channels, which split, but its up path
    also normalises 72 + 72 = 144 channels, and 144 does not split into 32 groups."""
    ch, levels = cfg.base_channels, len(cfg.channel_mults)
    if ch % 2:
        raise UserError(f"--base-channels {ch} must be even: the timestep embedding is pairs of cos and sin")
    widths = [ch * m for m in cfg.channel_mults]
    uneven = sorted({w for w in [ch, *widths, *up_block_inputs(cfg)] if w % norm_groups(w)})
    if uneven:
        raise UserError(f"--base-channels {ch} with --channel-mults {' '.join(map(str, cfg.channel_mults))} gives "
                        f"widths {uneven} (with the skip connections) that do not split evenly into GroupNorm groups "
                        f"(multiples of {MIN_CHANNELS_PER_GROUP} below {NORM_GROUPS * MIN_CHANNELS_PER_GROUP}, "
                        f"else of {NORM_GROUPS}); change --base-channels or --channel-mults")
    if image_size % 2 ** (levels - 1):
        raise UserError(f"image size {image_size} cannot be halved {levels - 1} times; use a multiple of "
                        f"{2 ** (levels - 1)} or fewer --channel-mults")
    sizes = [image_size // 2 ** i for i in range(levels)]
    if set(cfg.attn_resolutions) - set(sizes):
        raise UserError(f"--attn-resolutions {list(cfg.attn_resolutions)} must be among the feature-map sizes "
                        f"{sizes} of a {image_size}px model")
    if set(cfg.cross_attn_resolutions) - set(sizes):
        raise UserError(f"--cross-attn-resolutions {list(cfg.cross_attn_resolutions)} must be among the feature-map "
                        f"sizes {sizes} of a {image_size}px model")
    attended = set(cfg.attn_resolutions) | (set(cfg.cross_attn_resolutions) if cfg.cross_attention else set())
    attn_widths = {widths[-1]} | {w for w, s in zip(widths, sizes) if s in attended}  # mid block too
    for w in sorted(attn_widths):
        if w % cfg.num_heads:
            raise UserError(f"--num-heads {cfg.num_heads} does not divide the {w} channels of an attention "
                            "layer; pick a divisor")


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the embedding, GroupNorm-SiLU-dropout-conv, plus a (1×1 conv) skip.

    With scale_shift_norm the embedding gives a per-channel (scale, shift) applied after the second GroupNorm:
    h = norm(h)·(1 + scale) + shift (Nichol & Dhariwal); otherwise it is added to h before that norm (Ho et al.).
    """

    def __init__(self, in_ch, out_ch, emb_dim, dropout, scale_shift_norm):
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift_norm else out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):  # x [B, in_ch, H, W], emb [B, emb_dim] → [B, out_ch, H, W]
        # In place where autograd allows it (CPU time outside the convs is memory traffic): a conv's output is not
        # saved for its backward (its input is), so adding into it is safe; SiLU overwrites a fresh temporary.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # [B, out_ch or 2·out_ch, 1, 1]
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h.add_(e))
        h = self.conv2(self.dropout(F.silu(h, inplace=True)))
        return h.add_(self.skip(x))


def to_tokens(x):
    """[B, C, H, W] → [B, HW, C]: a free view when x is channels_last."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def heads(tokens, num_heads):
    """[B, N, C] → [B, heads, N, C/heads], the layout of F.scaled_dot_product_attention."""
    B, N, C = tokens.shape
    return tokens.view(B, N, num_heads, C // num_heads).transpose(1, 2)


def add_attended(x, h, proj):
    """The residual of an attention layer: x [B, C, H, W] plus proj of the heads' output h [B, heads, HW, C/heads]."""
    B, C, H, W = x.shape
    h = proj(h.transpose(1, 2).reshape(B, H * W, C))
    return x + h.view(B, H, W, C).permute(0, 3, 1, 2)  # back to [B, C, H, W] (channels_last strides)


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x):  # x [B, C, H, W] → same
        q, k, v = (heads(a, self.num_heads) for a in self.qkv(to_tokens(self.norm(x))).chunk(3, dim=2))
        return add_attended(x, F.scaled_dot_product_attention(q, k, v), self.proj)  # h: [B, heads, HW, C/heads]


class CrossAttention(nn.Module):
    """Every image position attends over the condition's tokens (one per label of a label set, plus a null token),
    with a residual connection, as text-to-image models attend over words. Unlike FiLM's one vector for the whole
    set, each position can pick the object it draws. `context` = (tokens [B, K+1, D], log_weight [B, K+1]): a
    label's log weight is log(its multi-hot value), so absent labels (−inf) get no attention and present ones the
    plain softmax; the null token (weight 1) is always attended, so a dropped or empty set is well defined."""

    def __init__(self, channels, token_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(token_dim, 2 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x, context):  # x [B, C, H, W] → same
        tokens, log_weight = context
        q = heads(self.q(to_tokens(self.norm(x))), self.num_heads)  # [B, heads, HW, C/heads]
        k, v = (heads(a, self.num_heads) for a in self.kv(tokens).chunk(2, dim=2))  # [B, heads, K+1, C/heads]
        mask = log_weight[:, None, None, :].to(q.dtype)  # [B, 1, 1, K+1], added to the attention logits
        return add_attended(x, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), self.proj)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):  # [B, C, H, W] → [B, C, H/2, W/2]
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # [B, C, H, W] → [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.Module):
    """One ResBlock, optionally followed by self-attention and attention over the condition's tokens: the unit of both
    the down and the up path. With cfg.cross_attention, every self-attention block also attends over the tokens, and
    so does every down- and up-path block at a size in cfg.cross_attn_resolutions (the middle blocks pass no size)."""

    def __init__(self, in_ch, out_ch, emb_dim, cfg, attn: bool, size: int = 0):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, cfg.scale_shift_norm)
        self.attn = Attention(out_ch, cfg.num_heads) if attn else nn.Identity()
        cross = cfg.cross_attention and (attn or size in cfg.cross_attn_resolutions)
        self.cross = CrossAttention(out_ch, emb_dim, cfg.num_heads) if cross else None

    def forward(self, x, emb, context=None):
        h = self.attn(self.res(x, emb))
        return h if self.cross is None else self.cross(h, context)


class UNet(nn.Module):
    """Predicts noise (or x0 / v; 2× channels with a learned variance) from x_t, t and an optional condition.

    cond_kind "class": `cond` is a LongTensor [B] of class indices; row `num_cond` of the embedding is the learned
    "no condition". cond_kind "multilabel": `cond` is a multi-hot float [B, num_cond] through a Linear layer, with a
    learned "no condition" vector. `drop` (bool [B]) replaces the condition by the null where True (classifier-free
    guidance training); `cond=None` on a conditional model means every condition is dropped.
    """

    def __init__(self, cfg, image_size: int, in_channels: int = 3, out_channels: int = 3,
                 cond_kind: str = "none", num_cond: int = 0):
        super().__init__()
        check_config(cfg, image_size)
        ch, levels = cfg.base_channels, len(cfg.channel_mults)
        widths = [ch * m for m in cfg.channel_mults]
        sizes = [image_size // 2 ** i for i in range(levels)]
        if cond_kind not in COND_KINDS:
            raise UserError(f"unknown condition kind {cond_kind!r}; choose one of {', '.join(COND_KINDS)}")
        if cond_kind != "none" and num_cond < 1:
            raise UserError(f"a {cond_kind!r}-conditional model needs num_cond ≥ 1 (got {num_cond})")
        self.cfg, self.image_size, self.cond_kind, self.num_cond = cfg, image_size, cond_kind, num_cond
        emb_dim = TIME_EMBED_MULT * ch

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cond_kind == "class":
            self.cond_emb = nn.Embedding(num_cond + 1, emb_dim)  # last row: the learned "no condition"
        elif cond_kind == "multilabel":
            self.cond_emb = nn.Linear(num_cond, emb_dim)
            self.null_emb = nn.Parameter(torch.randn(emb_dim) * 0.02)
        if cfg.cross_attention:
            if cond_kind != "multilabel":
                raise UserError("--cross-attention attends over the labels of a label set: it needs a multi-label "
                                "model (--dataset shapes --conditional)")
            # One token per label, and the null token last: what the cross-attention layers attend over.
            self.label_tokens = nn.Parameter(torch.randn(num_cond + 1, emb_dim) * 0.02)

        # Down path: every output is kept and concatenated onto one up-path block (widths: up_block_inputs).
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        w = ch
        for i, (width, size) in enumerate(zip(widths, sizes)):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Block(w, width, emb_dim, cfg, attn=size in cfg.attn_resolutions, size=size))
                w = width
            if i < levels - 1:
                self.down.append(Downsample(w))

        self.mid = nn.ModuleList([Block(w, w, emb_dim, cfg, attn=True), Block(w, w, emb_dim, cfg, attn=False)])

        # Up path: num_res_blocks + 1 blocks per level (one per skip), then upsample (except at the top level).
        self.up = nn.ModuleList()
        inputs = iter(up_block_inputs(cfg))
        for i in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Block(next(inputs), widths[i], emb_dim, cfg, attn=sizes[i] in cfg.attn_resolutions,
                                     size=sizes[i]))
                w = widths[i]
            if i > 0:
                self.up.append(Upsample(w))

        self.out = nn.Sequential(norm(w), nn.SiLU(inplace=True), zero_(nn.Conv2d(w, out_channels, 3, padding=1)))
        # NHWC weights: oneDNN's CPU convolutions and cuDNN's are fastest in channels_last, every activation follows
        # the weights' layout (the input may be NCHW), and attention's [B, HW, C] tokens are a free view of it.
        # Parameter names, shapes and values are unchanged: any state dict loads (copied into this layout).
        self.to(memory_format=torch.channels_last)

    def embed(self, t, cond, drop):
        """Time embedding plus condition embedding: [B, emb_dim]."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))
        if self.cond_kind == "none":
            if cond is not None:
                raise ValueError("this U-Net is unconditional (cond_kind='none') but a condition was passed")
            return emb
        B = t.shape[0]
        if self.cond_kind == "class":
            null = torch.full((B,), self.num_cond, dtype=torch.long, device=t.device)
            idx = null if cond is None else (cond if drop is None else torch.where(drop, null, cond))
            return emb + self.cond_emb(idx)
        null = self.null_emb.to(emb.dtype).expand(B, -1)
        if cond is None:
            return emb + null
        c = self.cond_emb(cond.to(self.cond_emb.weight.dtype))
        return emb + (c if drop is None else torch.where(drop[:, None], null.to(c.dtype), c))

    def context(self, cond, drop, batch):
        """What cross-attention attends over: (tokens [B, K+1, D], log weights [B, K+1]). A label's weight is its
        multi-hot value (0 where dropped or with no condition); the null token's is 1, so it is always attended."""
        if not self.cfg.cross_attention:
            return None
        device = self.label_tokens.device
        present = torch.zeros(batch, self.num_cond, device=device) if cond is None else cond.float()
        if drop is not None:
            present = torch.where(drop[:, None], torch.zeros_like(present), present)
        weight = torch.cat([present, torch.ones(batch, 1, device=device)], dim=1)
        return self.label_tokens.expand(batch, -1, -1), weight.log()

    def forward(self, x, t, cond=None, drop=None):
        """x [B, C, H, W], t [B] → [B, out_channels, H, W]."""
        emb = self.embed(t, cond, drop)
        ctx = self.context(cond, drop, x.shape[0])
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb, ctx)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, ctx)
        for layer in self.up:
            h = layer(h) if isinstance(layer, Upsample) else layer(torch.cat([h, skips.pop()], dim=1), emb, ctx)
        return self.out(h)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
