"""Issue 17, training side: every value checked once (flags and checkpoints alike), run folders that cannot be
hijacked (lock, ownership, data fingerprint), one resume path for both loops. Tiny sizes: the file runs in seconds."""
import dataclasses
import math
from typing import Optional

import pytest

from tinyddpm.config import build_config, check_values, validate
from tinyddpm.errors import UserError


# ------------------------------------------------------------------------------- one metadata-driven value check
@dataclasses.dataclass
class Options:  # any dataclass whose fields carry the metadata works (sample.py's options, for one)
    eta: float = dataclasses.field(default=0.0, metadata=dict(min=0.0, max=1.0))
    scale: float = dataclasses.field(default=1.0, metadata=dict(min=0.0, flag="--cfg-scale"))
    steps: Optional[int] = dataclasses.field(default=None, metadata=dict(min=1))
    mode: str = dataclasses.field(default="a", metadata=dict(choices=("a", "b")))
    sizes: tuple = dataclasses.field(default=(1,), metadata=dict(type=int, min=1, min_items=1))
    big: float = dataclasses.field(default=math.inf, metadata=dict(finite=False))


@pytest.mark.parametrize("change, words", [
    (dict(eta=math.nan), ["--eta", "finite"]), (dict(eta=math.inf), ["--eta", "finite"]),
    (dict(eta=1.5), ["--eta", "between 0.0 and 1.0"]), (dict(scale=-1.0), ["--cfg-scale", "at least 0"]),
    (dict(scale=-math.inf), ["--cfg-scale", "finite"]), (dict(steps=0), ["--steps", "at least 1"]),
    (dict(steps=2**64), ["--steps", "64-bit"]), (dict(steps=True), ["--steps", "an integer"]),
    (dict(steps=2.0), ["--steps", "an integer"]), (dict(mode="c"), ["--mode", "one of a, b"]),
    (dict(sizes=()), ["--sizes", "at least 1"]), (dict(sizes=(1, 0)), ["--sizes", "each"]),
    (dict(sizes="12"), ["--sizes", "a list of integers"]), (dict(sizes=(1, "2")), ["--sizes", "integers"]),
    (dict(big=math.nan), ["--big", "finite"]), (dict(eta="0.5"), ["--eta", "a number"]),
])
def test_check_values_names_the_flag(change, words):
    with pytest.raises(UserError) as e:
        check_values(dataclasses.replace(Options(), **change))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_check_values_accepts_good_values_and_says_where_a_file_is_wrong():
    check_values(Options(eta=1.0, steps=3, sizes=(1, 2), big=-math.inf, scale=7))  # an int where a float belongs
    with pytest.raises(UserError, match=r"^x/ckpt.pt holds a value .*--eta.*damaged or was edited"):
        check_values(Options(eta=-1.0), where="x/ckpt.pt")


@pytest.mark.parametrize("overrides, words", [
    ({"unet": {"base_channels": 36, "channel_mults": (1, 2)}}, ["GroupNorm", "144"]),  # a skip width (issue 16 #4)
    ({"unet": {"base_channels": 1}}, ["--base-channels 1"]),
    ({"unet": {"base_channels": 3, "channel_mults": (1,)}}, ["--base-channels 3", "even"]),
    ({"unet": {"num_heads": 0}}, ["--num-heads"]),
    ({"unet": {"num_heads": 3}}, ["--num-heads 3"]),  # the middle block's attention always exists
    ({"diffusion": {"timesteps": 0}}, ["--timesteps"]),
    ({"diffusion": {"timesteps": 10**9}}, ["--timesteps"]),
    ({"train": {"grid_eta": math.inf}}, ["--grid-eta"]),
    ({"train": {"grid_sampler": "euler"}}, ["--grid-sampler", "ddim"]),
    ({"train": {"batch_size": 10**9}}, ["--batch-size"]),
    ({"train": {"seed": 2**64}}, ["--seed", "64-bit"]),
    ({"train": {"ema_decay": math.nan}}, ["--ema-decay"]),
    ({"data": {"image_size": 10**6}}, ["--image-size"]),
])
def test_validate_refuses_bad_diffusion_configs(overrides, words):
    with pytest.raises(UserError) as e:
        validate(build_config("tiny", overrides))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("overrides, words", [
    ({"gan": {"z_dim": 0}}, ["--z-dim"]), ({"gan": {"g_channels": 0}}, ["--g-channels"]),
    ({"gan": {"d_channels": -1}}, ["--d-channels"]), ({"gan": {"beta1": math.nan}}, ["--beta1"]),
    ({"gan": {"beta1": 2.0}}, ["--beta1"]), ({"gan": {"instance_noise": -1.0}}, ["--instance-noise"]),
    ({"data": {"image_size": 24}}, ["power of two"]),
])
def test_validate_refuses_bad_gan_configs(overrides, words):
    with pytest.raises(UserError) as e:
        validate(build_config("tiny", overrides, model="dcgan"))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("preset", ["tiny", "small", "ddpm-cifar"])
@pytest.mark.parametrize("model", ["ddpm", "dcgan"])
def test_presets_are_valid(preset, model):
    validate(build_config(preset, {}, model=model))
