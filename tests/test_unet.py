"""The DDPM U-Net: size of the paper's model, shapes, attention placement, time and condition dependence,
classifier-free-guidance dropping, zero init, memory-format invariance, gradients and torch.compile tracing."""
import dataclasses

import pytest
import torch

from tinyddpm.config import UNetConfig, build_config
from tinyddpm.errors import UserError
from tinyddpm.unet import Attention, UNet, count_parameters

DDPM_CIFAR_PARAMS = 35.7e6  # Ho et al. (2020), Table/Appendix B; diffusers' UNet2DModel: 35,746,307
TINY = build_config("tiny", {"unet": {"attn_resolutions": ()}}).unet  # tiny without its coarsest-level attention
# The tiny preset plus attention and two heads, on 16 px images (levels at 16, 8, 4 px): every kind of layer, fast.
SIZE = 16
TINY_ATTN = dataclasses.replace(TINY, attn_resolutions=(8,), num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def randomize_(model, std=0.1, seed=0):
    """Give the zero-initialised layers random weights, so the output (and every gradient) depends on all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(batch=4, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def test_ddpm_cifar_has_the_papers_parameter_count():
    cfg = build_config("ddpm-cifar", {}).unet
    n = count_parameters(UNet(cfg, 32))
    assert abs(n - DDPM_CIFAR_PARAMS) / DDPM_CIFAR_PARAMS < 0.02, n
    assert n == 35_746_307  # exactly diffusers' UNet2DModel at the same configuration


@pytest.mark.parametrize("size,out_channels", [(32, 3), (64, 3), (32, 6)])
def test_output_shape(size, out_channels):
    model = UNet(TINY, size, out_channels=out_channels)
    x, t = inputs(2, size)
    assert model(x, t).shape == (2, out_channels, size, size)


def test_attention_only_at_chosen_resolutions_and_in_the_middle():
    model = UNet(TINY_ATTN, SIZE)  # levels at 16, 8, 4 px; attention asked at 8
    seen = []
    for m in model.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-1]))
    model(*inputs(1))
    blocks = TINY_ATTN.num_res_blocks
    assert sorted(seen) == [4] + [8] * (blocks + blocks + 1)  # middle; down and up path at 8 px
    assert sum(isinstance(m, Attention) for m in UNet(TINY, SIZE).modules()) == 1  # only the middle one


def test_zero_init_gives_zero_output():
    model = UNet(TINY_ATTN, SIZE)
    assert model(*inputs()).abs().max() == 0  # the final conv starts at zero (improved-diffusion)


def test_output_depends_on_time_and_float_time_works():
    model = randomize_(UNet(TINY, SIZE)).eval()
    x, _ = inputs(2)
    a = model(x, torch.tensor([10, 10]))
    b = model(x, torch.tensor([900, 900]))
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(model(x, torch.tensor([10.0, 10.0])), a, atol=1e-6)


@pytest.mark.parametrize("kind", ["class", "multilabel"])
def test_condition_changes_output_and_drop_equals_none(kind):
    torch.manual_seed(0)
    model = randomize_(UNet(TINY, SIZE, cond_kind=kind, num_cond=5)).eval()
    x, t = inputs(4)
    if kind == "class":
        c1, c2 = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 0, 1])
    else:
        c1 = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float)
        c2 = 1 - c1
    y1, y2, y_null = model(x, t, c1), model(x, t, c2), model(x, t)
    assert ((y1 - y2).flatten(1).abs().amax(1) > 1e-4).all()  # every sample sees its own condition
    assert ((y1 - y_null).flatten(1).abs().amax(1) > 1e-4).all()
    assert torch.equal(model(x, t, c1, drop=torch.ones(4, dtype=torch.bool)), y_null)
    assert torch.equal(model(x, t, c1, drop=torch.zeros(4, dtype=torch.bool)), y1)
    mixed = model(x, t, c1, drop=torch.tensor([True, False, True, False]))
    assert torch.allclose(mixed[0::2], y_null[0::2], atol=1e-6) and torch.allclose(mixed[1::2], y1[1::2], atol=1e-6)


def test_channels_last_gives_the_same_output():
    model = randomize_(UNet(TINY_ATTN, SIZE)).eval()
    x, t = inputs(2)
    ref = model(x, t)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_ATTN, scale_shift_norm=True, dropout=0.1)
    model = randomize_(UNet(cfg, SIZE, cond_kind="class", num_cond=3))
    x, t = inputs(4)
    out = model(x, t, torch.tensor([0, 1, 2, 0]), drop=torch.tensor([False, False, False, True]))
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead


def test_scale_shift_norm_doubles_the_embedding_projections():
    plain, film = UNet(TINY, SIZE), UNet(dataclasses.replace(TINY, scale_shift_norm=True), SIZE)
    extra = sum(m.res.emb_proj.out_features // 2 * (m.res.emb_proj.in_features + 1)
                for m in film.modules() if hasattr(m, "res"))
    assert count_parameters(film) - count_parameters(plain) == extra


def test_bf16_autocast_and_fullgraph_compile_trace():
    small = dataclasses.replace(TINY_ATTN, channel_mults=(1, 2))  # fewer layers to trace: same kinds of layer
    model = randomize_(UNet(small, SIZE, cond_kind="multilabel", num_cond=4)).eval()
    x, t = inputs(2)
    cond, drop = torch.rand(2, 4).round(), torch.tensor([True, False])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, t, cond, drop)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    # fullgraph=True raises on any graph break (e.g. data-dependent Python control flow); the eager backend
    # checks the tracing without paying for code generation.
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x, t, cond, drop), model(x, t, cond, drop), atol=1e-6)


@pytest.mark.parametrize("change,kwargs,match", [
    (dict(), dict(image_size=18), "cannot be halved"),
    (dict(attn_resolutions=(2,)), dict(), "attn-resolutions"),
    (dict(base_channels=30), dict(), "GroupNorm groups"),
    (dict(attn_resolutions=(8,), num_heads=3), dict(), "num-heads"),
    (dict(), dict(cond_kind="text", num_cond=3), "unknown condition kind"),
    (dict(), dict(cond_kind="class", num_cond=0), "num_cond"),
])
def test_bad_configs_are_user_errors(change, kwargs, match):
    kwargs = {"image_size": SIZE, **kwargs}
    with pytest.raises(UserError, match=match):
        UNet(dataclasses.replace(TINY, **change), **kwargs)


def test_condition_passed_to_an_unconditional_model_is_refused():
    x, t = inputs(2)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(TINY, SIZE)(x, t, torch.tensor([0, 1]))
