"""--cross-attention: every attention block of a label-set model also attends over one token per label present.

Checked against the attention formula written out, per image: a label absent from an image's set (or a dropped set)
cannot change that image, a present one does, and the null token is always attended. Then the U-Net's usual
properties with the layers on (zero init, drop = no condition, every parameter trained, bf16 and a fullgraph trace),
the refusals, and train.py + sample.py in-process on a shapes model."""
import dataclasses
import math
import re

import pytest
import torch

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, run_script
from tests.test_unet import SIZE, TINY_ATTN, inputs, randomize_
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.config import RunConfig, build_config, user_overrides, validate
from tinyddpm.errors import UserError
from tinyddpm.unet import CrossAttention, UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

CROSS = dataclasses.replace(TINY_ATTN, cross_attention=True)
LABELS = 5
# Three images' label sets: two labels, one label, all but one.
SETS = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.float)


def model(seed=0, resolutions=()):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(CROSS, cross_attn_resolutions=resolutions)
    return randomize_(UNet(cfg, SIZE, cond_kind="multilabel", num_cond=LABELS), seed=seed).eval()


def cross_layers(net):
    """(feature-map width of each block with a cross-attention layer, has it self-attention) for every block."""
    return [(m.cross.q.in_features, not isinstance(m.attn, torch.nn.Identity))
            for m in net.modules() if getattr(m, "cross", None) is not None]


def test_cross_attention_matches_the_formula_with_absent_labels_masked():
    """out = x + proj(Σ_i w_i e^{q·k_i/√d} v_i / Σ_i w_i e^{q·k_i/√d}), per head, with w the multi-hot weights."""
    torch.manual_seed(0)
    C, D, heads, B, H = 8, 6, 2, 3, 4
    layer = randomize_(CrossAttention(C, D, heads))
    x, tokens = torch.randn(B, C, H, H), torch.randn(B, LABELS + 1, D)
    weight = torch.cat([SETS, torch.ones(B, 1)], dim=1)  # the null token last, always weight 1
    out = layer(x, (tokens, weight.log()))

    q = layer.q(layer.norm(x).flatten(2).transpose(1, 2))  # [B, HW, C]
    k, v = layer.kv(tokens).chunk(2, dim=2)  # [B, K+1, C] each
    d = C // heads
    want = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        logits = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d)  # [B, HW, K+1]
        p = weight[:, None, :] * logits.exp()
        want.append((p / p.sum(-1, keepdim=True)) @ v[..., s])
    want = x + layer.proj(torch.cat(want, dim=2)).transpose(1, 2).reshape(B, C, H, H)
    assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("resolutions", [(), (SIZE, SIZE // 4)])  # also at the 16 and 4 px levels
def test_an_image_sees_the_tokens_of_its_own_labels_only(resolutions):
    net = model(resolutions=resolutions)
    x, t = inputs(3)
    base = net(x, t, SETS)
    for label in range(LABELS + 1):  # the last row: the null token
        with torch.no_grad():
            net.label_tokens[label] += 1.0
        changed = (net(x, t, SETS) - base).flatten(1).abs().amax(1) > 1e-5  # [3]: which images moved
        with torch.no_grad():
            net.label_tokens[label] -= 1.0
        present = torch.ones(3, dtype=torch.bool) if label == LABELS else SETS[:, label].bool()
        assert torch.equal(changed, present), (label, changed)


def test_a_dropped_set_sees_the_null_token_only_and_equals_no_condition():
    net = model()
    x, t = inputs(3)
    null = net(x, t)
    assert torch.equal(net(x, t, SETS, drop=torch.ones(3, dtype=torch.bool)), null)
    mixed = net(x, t, SETS, drop=torch.tensor([True, False, True]))
    assert torch.allclose(mixed[0::2], null[0::2], atol=1e-6)
    assert torch.allclose(mixed[1], net(x, t, SETS)[1], atol=1e-6)
    assert ((net(x, t, SETS) - null).flatten(1).abs().amax(1) > 1e-4).all()


def test_every_attention_block_gets_cross_attention_and_starts_as_the_identity():
    net = UNet(CROSS, SIZE, cond_kind="multilabel", num_cond=LABELS)
    plain = UNet(TINY_ATTN, SIZE, cond_kind="multilabel", num_cond=LABELS)
    blocks = [m for m in net.modules() if hasattr(m, "cross")]
    assert sum(m.cross is not None for m in blocks) == sum(not isinstance(m.attn, torch.nn.Identity) for m in blocks)
    assert sum(m.cross is not None for m in blocks) == 2 * CROSS.num_res_blocks + 2  # down, up (N+1), middle
    # Zero-initialised output projections: the same function as the model without the layers, at the same seed.
    x, t = inputs(3)
    torch.manual_seed(1)
    a = randomize_(UNet(CROSS, SIZE, cond_kind="multilabel", num_cond=LABELS))
    b = UNet(TINY_ATTN, SIZE, cond_kind="multilabel", num_cond=LABELS)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k in plain.state_dict()})
    for m in a.modules():
        if isinstance(m, CrossAttention):
            torch.nn.init.zeros_(m.proj.weight)
            torch.nn.init.zeros_(m.proj.bias)
    assert torch.equal(a(x, t, SETS), b(x, t, SETS))


@pytest.mark.parametrize("resolutions,extra", [((SIZE,), 3), ((SIZE, SIZE // 4), 6)])
def test_cross_attn_resolutions_add_layers_to_every_block_of_those_sizes(resolutions, extra):
    """TINY_ATTN at 16 px has levels 16, 8, 4 px, one block down and two up per level: a size adds 3 layers to the
    4 of the attention blocks; the added ones sit in blocks without self-attention. Every layer starts as 0."""
    plain, net = model(), model(resolutions=resolutions)
    assert len(cross_layers(net)) == len(cross_layers(plain)) + extra
    assert sum(not attn for _, attn in cross_layers(net)) == extra
    fresh = UNet(dataclasses.replace(CROSS, cross_attn_resolutions=resolutions), SIZE, cond_kind="multilabel",
                 num_cond=LABELS)
    assert all(not m.proj.weight.any() and not m.proj.bias.any() for m in fresh.modules()
               if isinstance(m, CrossAttention))


@pytest.mark.parametrize("unet,words", [
    (dict(cross_attention=False, cross_attn_resolutions=(16,)), "needs --cross-attention"),
    (dict(cross_attention=True, cross_attn_resolutions=(12,)), "must be among the feature-map sizes [32, 16, 8]"),
    # 64 heads divide the 64 channels of the 8 px level and the middle, not the 32 of the 32 px level
    (dict(cross_attention=True, cross_attn_resolutions=(32,), num_heads=64), "--num-heads 64 does not divide the 32"),
])
def test_config_refuses_misplaced_cross_attention_layers(unet, words):
    cfg = build_config("tiny", {"data": {"dataset": "shapes", "image_size": 32}, "cond": {"conditional": True},
                                "unet": unet})
    with pytest.raises(UserError, match=re.escape(words)):
        validate(cfg)


SHAPES = {"data": {"dataset": "shapes", "image_size": 32}, "cond": {"conditional": True}}


@pytest.mark.parametrize("image_size,mults,want", [(32, (1, 1, 2), (16,)), (64, (1, 1, 2), (32,)),
                                                   (32, (1, 2), (32,)), (32, (1,), ())])
def test_tiny_shapes_models_cross_attend_one_level_above_the_coarsest(image_size, mults, want):
    """The default for the tiny preset is a level, so it exists at any size: 16 px at 32 (levels 32, 16, 8), 32 px
    at 64; with one level there is none above the coarsest."""
    cfg = build_config("tiny", {**SHAPES, "data": {"dataset": "shapes", "image_size": image_size},
                                "unet": {"channel_mults": mults}})
    assert cfg.unet.cross_attention and cfg.unet.cross_attn_resolutions == want
    validate(cfg)  # every default size exists in the model


@pytest.mark.parametrize("preset,overrides,model_kind", [
    ("tiny", {"unet": {"cross_attn_resolutions": ()}}, "ddpm"),  # `--cross-attn-resolutions` with no sizes
    ("tiny", {"unet": {"cross_attention": False}}, "ddpm"),     # --no-cross-attention
    ("tiny", {"cond": {"conditional": False}}, "ddpm"),         # no label set to attend over
    ("tiny", {}, "dcgan"),
    ("small", {}, "ddpm"),                                      # measured on tiny only
])
def test_no_added_cross_attention_layers_where_not_asked_or_not_measured(preset, overrides, model_kind):
    cfg = build_config(preset, {**SHAPES, **overrides}, model=model_kind)
    assert cfg.unet.cross_attn_resolutions == ()
    validate(cfg)  # so --no-cross-attention alone is never refused for the default's layers


@pytest.mark.parametrize("flags,want", [([], (16,)), (["--cross-attn-resolutions"], ()),
                                         (["--cross-attn-resolutions", "32", "16"], (32, 16))])
def test_train_py_flags_keep_or_replace_the_default_cross_attention_sizes(flags, want):
    args = train.build_parser().parse_args(["--dataset", "shapes", "--conditional", "--image-size", "32", *flags])
    assert build_config("tiny", user_overrides(args)).unet.cross_attn_resolutions == want


def test_a_config_from_before_cross_attn_resolutions_rebuilds_without_them():
    d = build_config("tiny", {"data": {"dataset": "shapes"}, "cond": {"conditional": True}}).to_dict()
    del d["unet"]["cross_attn_resolutions"]
    assert RunConfig.from_dict(d).unet.cross_attn_resolutions == ()


def test_gradient_reaches_every_parameter_with_cross_attention():
    net = model()
    net.train()
    x, t = inputs(3)
    net(x, t, SETS, drop=torch.tensor([False, False, True])).square().mean().backward()
    assert not [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]


def test_bf16_autocast_and_fullgraph_compile_trace_with_cross_attention():
    net = model()
    x, t = inputs(3)
    drop = torch.tensor([True, False, False])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x, t, SETS, drop)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x, t, SETS, drop), net(x, t, SETS, drop), atol=1e-6)


@pytest.mark.parametrize("kind", ["none", "class"])
def test_cross_attention_needs_a_label_set_model(kind):
    with pytest.raises(UserError, match="multi-label"):
        UNet(CROSS, SIZE, cond_kind=kind, num_cond=0 if kind == "none" else 3)


@pytest.mark.parametrize("overrides,model_kind", [
    ({"data": {"dataset": "cifar"}, "cond": {"conditional": True}}, "ddpm"),
    ({"data": {"dataset": "shapes"}}, "ddpm"),  # unconditional
    ({"data": {"dataset": "shapes"}, "cond": {"conditional": True}}, "dcgan"),
])
def test_config_refuses_cross_attention_without_label_sets(overrides, model_kind):
    cfg = build_config("tiny", {**overrides, "unet": {"cross_attention": True}}, model=model_kind)
    with pytest.raises(UserError, match="--cross-attention"):
        validate(cfg)
    ok = build_config("tiny", {"data": {"dataset": "shapes"}, "cond": {"conditional": True},
                               "unet": {"cross_attention": True}})
    assert validate(ok).unet.cross_attention


def test_train_refuses_cross_attention_on_cifar_in_one_line(tmp_path, capsys):
    code, _, err = run_script(train, ["--dataset", "cifar", "--class", "cat", "--cross-attention",
                                      "--out", str(tmp_path / "r"), *MICRO_FLAGS], capsys)
    assert_user_error(code, err, "--cross-attention", "--dataset shapes --conditional")
    assert not (tmp_path / "r").exists()
    code, _, err = run_script(train, ["--dataset", "shapes", "--conditional", "--no-cross-attention",
                                      "--cross-attn-resolutions", "16", "--out", str(tmp_path / "r"), *MICRO_FLAGS],
                              capsys)
    assert_user_error(code, err, "--cross-attn-resolutions", "needs --cross-attention")
    assert not (tmp_path / "r").exists()


def test_train_and_sample_a_shapes_model_with_cross_attention(tmp_path, capsys):
    out = tmp_path / "run"
    # MICRO_FLAGS turn self-attention off; the middle block still attends, so it gets a cross-attention layer, and
    # so do the 16 px blocks, one level above the coarsest (config.CROSS_ATTEND_NEXT_TO_COARSEST).
    flags = ["--dataset", "shapes", "--conditional", "--shapes-count", "16", "--image-size", "16", "--scale-shift-norm",
             "--cross-attention", "--steps", "3", "--out", str(out), *MICRO_FLAGS]
    code, _, err = run_script(train, flags, capsys)
    assert code == 0, err
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["config"]["unet"]["cross_attention"] is True
    assert any(k.startswith("mid.0.cross.") for k in ckpt["models"]["ema"]) and "label_tokens" in ckpt["models"]["ema"]
    assert tuple(ckpt["config"]["unet"]["cross_attn_resolutions"]) == (16,)
    argv = ["--ckpt", str(out / "ckpt.pt"), "--labels", "red cube, blue sphere", "--n", "2", "--steps", "2",
            "--out", str(tmp_path / "s"), "--device", "cpu"]
    code, _, err = run_script(sample, argv, capsys)
    assert code == 0, err
