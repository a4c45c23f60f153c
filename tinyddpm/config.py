"""Every hyperparameter, named once: dataclass configs, named presets, and the command-line flags made from them.

A run is described by one `RunConfig` (data, model, diffusion, GAN and training sections). It is stored in each
checkpoint as plain data (`to_dict`) and rebuilt with `from_dict`, so no Python classes are ever pickled.
Flags are generated from the fields (`--base-channels`, `--attn-resolutions 16 8`, …); a flag the user passes
overrides the preset, which overrides the dataclass default.
"""
import argparse
import dataclasses
from dataclasses import dataclass, field, fields

from .checks import check_values, flag_name, in_file  # check_values: the one value check, for any dataclass
from .constants import MAX_BATCH, MODEL_KINDS, SAMPLERS
from .diffusion import EDM_LEVELS, OBJECTIVES, TRAIN_LEVELS
from .errors import UserError
from .models import check_architecture
from .posthoc_ema import MAX_SIGMA_REL

# Upper bounds on sizes: far beyond any sensible run, they turn a typo (an extra zero or six) into one line
# instead of an out-of-memory traceback minutes later.
MAX_IMAGE_SIZE = 1024
MAX_WIDTH = 4096  # channels of a layer, latent size, attention heads
MAX_MULT = 64  # U-Net channel multiplier per level
MAX_BLOCKS = 64  # residual blocks per U-Net level
MAX_TIMESTEPS = 100_000
MAX_MINUTES = 10 * 24 * 60  # a time budget of ten days: beyond it, a typo
MAX_GRID = 1024  # images in a training sample grid
MAX_SHAPES = 1_000_000  # rendered shapes scenes (3 KB each at 32 px, all held in memory)
LR_DECAYS = ("constant", "cosine")


@dataclass
class DataConfig:
    dataset: str = field(default="cifar", metadata=dict(choices=("cifar", "folder", "shapes"),
                                                         help="training data"))
    data_dir: str = field(default="data", metadata=dict(help="where datasets live (CIFAR-10 is downloaded here)"))
    classes: tuple = field(default=(), metadata=dict(flag="--class", nargs="+",
                                                     help="CIFAR-10 class names or indices (default: all)"))
    image_size: int = field(default=32, metadata=dict(min=1, max=MAX_IMAGE_SIZE,
                                                  help="training resolution (folders are resized/cropped)"))
    flip: bool = field(default=True, metadata=dict(help="random horizontal flips"))
    shapes_count: int = field(default=20_000, metadata=dict(min=1, max=MAX_SHAPES,
                                                        help="scenes rendered for --dataset shapes (train)"))


@dataclass
class UNetConfig:
    base_channels: int = field(default=128, metadata=dict(min=1, max=MAX_WIDTH,
                                                       help="channels at the first U-Net level"))
    channel_mults: tuple = field(default=(1, 2, 2, 2), metadata=dict(nargs="+", type=int, min=1, max=MAX_MULT,
                                                                     min_items=1,
                                                                     help="channel multiplier per level"))
    num_res_blocks: int = field(default=2, metadata=dict(min=1, max=MAX_BLOCKS, help="residual blocks per level"))
    attn_resolutions: tuple = field(default=(16,), metadata=dict(nargs="*", type=int, min=1, max=MAX_IMAGE_SIZE,
                                                                 help="feature-map sizes with self-attention"))
    num_heads: int = field(default=1, metadata=dict(min=1, max=MAX_WIDTH, help="attention heads"))
    dropout: float = field(default=0.1, metadata=dict(min=0.0, lt=1.0, help="dropout in residual blocks"))
    scale_shift_norm: bool = field(default=False, metadata=dict(help="FiLM-style GroupNorm (Nichol & Dhariwal)"))
    cross_attention: bool = field(default=False, metadata=dict(help=(
        "label sets (--dataset shapes): every attention block also attends over one learned token per label present "
        "(docs/shapes.md)")))
    cross_attn_resolutions: tuple = field(default=(), metadata=dict(nargs="*", type=int, min=1, max=MAX_IMAGE_SIZE,
                                                                    help=(
        "with --cross-attention: feature-map sizes whose down- and up-path blocks also attend over the label set, "
        "besides the attention blocks")))


@dataclass
class DiffusionConfig:
    timesteps: int = field(default=1000, metadata=dict(min=1, max=MAX_TIMESTEPS, help="diffusion steps T"))
    schedule: str = field(default="linear", metadata=dict(choices=("linear", "cosine", "sigmoid"),
                                                          help="noise schedule"))
    objective: str = field(default="eps", metadata=dict(choices=OBJECTIVES, help=(
        "what the model predicts: ε, x0, v, or edm (EDM's preconditioned F, Karras et al. 2022)")))
    learn_sigma: bool = field(default=False, metadata=dict(help="learn the variance (hybrid loss)"))
    vlb_weight: float = field(default=0.001, metadata=dict(min=0.0,
                                                         help="λ of L_simple + λ·L_vlb with --learn-sigma"))
    min_snr_gamma: float = field(default=0.0, metadata=dict(min=0.0, help=(
        "min-SNR-γ loss weighting (Hang et al. 2023): each timestep's MSE weighted as if its SNR were capped at γ "
        "(5 in the paper); 0: off, plain L_simple")))
    sigma_data: float = field(default=0.5, metadata=dict(gt=0.0, help="the data's std, for --objective edm"))
    train_levels: str = field(default="uniform", metadata=dict(choices=TRAIN_LEVELS, help=(
        "training noise levels: a uniform whole timestep, or EDM's lognormal ln σ ~ N(--p-mean, --p-std²)")))
    p_mean: float = field(default=EDM_LEVELS[1], metadata=dict(help="mean of ln σ for --train-levels lognormal"))
    p_std: float = field(default=EDM_LEVELS[2], metadata=dict(gt=0.0, help="std of ln σ for lognormal levels"))


@dataclass
class CondConfig:
    conditional: bool = field(default=False, metadata=dict(help="condition on the class / label set"))
    cond_drop: float = field(default=0.1, metadata=dict(min=0.0, max=1.0,
                                                      help="probability of dropping the condition (for CFG)"))


@dataclass
class GANConfig:
    z_dim: int = field(default=100, metadata=dict(min=1, max=MAX_WIDTH, help="DCGAN latent size"))
    g_channels: int = field(default=64, metadata=dict(min=1, max=MAX_WIDTH, help="DCGAN generator width"))
    d_channels: int = field(default=64, metadata=dict(min=1, max=MAX_WIDTH, help="DCGAN discriminator width"))
    beta1: float = field(default=0.5, metadata=dict(min=0.0, lt=1.0, help="Adam β1 for both GAN networks"))
    label_smoothing: str = field(default="one", metadata=dict(choices=("none", "one", "two"),
                                                              help="one: real=0.9; two: also fake=0.1"))
    instance_noise: float = field(default=0.1, metadata=dict(min=0.0, help="std of noise on D's inputs at step 0"))
    noise_anneal_steps: int = field(default=0, metadata=dict(
        min=0, help="steps over which instance noise falls to 0 (0: half of --steps)"))


@dataclass
class TrainConfig:
    steps: int = field(default=100_000, metadata=dict(min=1, help=(
        "optimizer steps in total (a fixed count: turns the preset's --minutes budget off)")))
    minutes: float = field(default=0.0, metadata=dict(min=0.0, max=MAX_MINUTES, help=(
        "time budget: time the first steps on this machine, then fix --steps to fill M minutes of training "
        "(stored in the run; a resume finishes that count); 0: train --steps")))
    batch_size: int = field(default=128, metadata=dict(min=1, max=MAX_BATCH,
                                                    help="images per step (global batch under torchrun)"))
    lr: float = field(default=2e-4, metadata=dict(gt=0.0, help="learning rate"))
    warmup: int = field(default=1000, metadata=dict(min=0, help="linear learning-rate warm-up steps"))
    lr_decay: str = field(default="constant", metadata=dict(choices=LR_DECAYS, help=(
        "after the warm-up: constant (Ho et al.), or cosine decay to 0 at --steps (resuming with a larger --steps "
        "stretches the rest of the decay to the new end)")))
    weight_decay: float = field(default=0.0, metadata=dict(min=0.0, help="AdamW weight decay"))
    grad_clip: float = field(default=1.0, metadata=dict(min=0.0, help="gradient-norm clip (0: off)"))
    ema_decay: float = field(default=0.9999, metadata=dict(min=0.0, max=1.0, help="EMA decay of the weights"))
    ema_warmup: bool = field(default=True, metadata=dict(
        help="EMA warm-up: decay min(decay, (1+s)/(10+s)), so early samples are not dominated by the init"))
    posthoc_ema: tuple = field(default=(), metadata=dict(nargs="*", type=float, gt=0.0, lt=MAX_SIGMA_REL, help=(
        "post-hoc EMA (Karras et al. 2024): track one power-function EMA per relative length σ_rel (EDM2 tracks "
        "0.05 0.1) and store them in the run's posthoc/, so that sample.py --posthoc-ema S rebuilds the average of "
        "any length S after training; none: off")))
    posthoc_every: int = field(default=250, metadata=dict(min=1, help=(
        "with --posthoc-ema: steps between the stored averages (also stored with every checkpoint)")))
    # < 1: a snapshot of the final weights would be the final model itself, doubling sampling for nothing.
    guide_at: float = field(default=0.0, metadata=dict(min=0.0, lt=1.0, help=(
        "keep the EMA weights after this fraction of --steps as the autoguidance model that sample.py uses by "
        "default (Karras et al. 2024; docs/recipe.md); 0: none")))
    guide_channels: int = field(default=0, metadata=dict(min=0, max=MAX_WIDTH, help=(
        "train a narrower U-Net (this many base channels) on the same batches until the --guide-at step and keep "
        "its EMA there as the autoguidance model; 0: the main network's own EMA")))
    seed: int = field(default=0, metadata=dict(help="seed for weights, data order and noise"))
    compile: bool = field(default=False, metadata=dict(help="torch.compile the training step"))
    log_every: int = field(default=50, metadata=dict(min=1, help="steps between progress lines"))
    sample_every: int = field(default=2000, metadata=dict(min=1, help="steps between EMA sample grids"))
    save_every: int = field(default=2000, metadata=dict(min=1, help="steps between checkpoints"))
    grid_size: int = field(default=64, metadata=dict(min=1, max=MAX_GRID, help="images in each sample grid"))
    grid_steps: int = field(default=100, metadata=dict(min=1, help="sampler steps for the sample grids"))
    grid_eta: float = field(default=1.0, metadata=dict(min=0.0, max=1.0,
        help="DDIM η of the sample grids: 1 (stochastic) shows what a young model has learned, where η = 0's "
             "deterministic path turns its errors into saturated noise (README, 'Which sampler')"))
    grid_sampler: str = field(default="ddim", metadata=dict(choices=SAMPLERS, help="sampler of the sample grids"))


@dataclass
class RunConfig:
    model: str = "ddpm"  # "ddpm" or "dcgan"
    preset: str = "small"
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Rebuild from plain data; unknown keys are an error (a checkpoint from a newer tinyddpm)."""
        if not isinstance(d, dict):
            raise UserError(f"the config is {type(d).__name__}, not a table of sections")
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in SECTIONS:
                sub = type(getattr(cls(), f.name))
                if not isinstance(v, dict):
                    raise UserError(f"config section {f.name!r} is {type(v).__name__}, not a table of fields")
                known = {g.name: g for g in fields(sub)}
                unknown = set(v) - set(known)
                if unknown:
                    raise UserError(f"config section {f.name!r} has unknown fields {sorted(unknown)[:5]}; it was "
                                    "written by a newer tinyddpm, or edited")
                v = sub(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
            kwargs[f.name] = v
        return cls(**kwargs)


SECTIONS = ("data", "unet", "diffusion", "cond", "gan", "train")


def validate(cfg, where=None):
    """The one check of a RunConfig, whether it came from flags or from a checkpoint (`where`: its path), made before
    anything is built or written: every field (check_values), the model kind and the networks' shapes
    (models.check_architecture: GroupNorm widths, image size, attention heads)."""
    try:
        if cfg.model not in MODEL_KINDS:
            raise UserError(f"--model must be one of {', '.join(MODEL_KINDS)} (got {cfg.model!r})")
        if not isinstance(cfg.preset, str) or cfg.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)} (got {cfg.preset!r})")
        for name in SECTIONS:
            check_values(getattr(cfg, name))
        if cfg.train.posthoc_ema and cfg.model != "ddpm":
            raise UserError("--posthoc-ema averages a diffusion model's weights; drop it for --model dcgan")
        if cfg.train.guide_channels and (cfg.model != "ddpm" or not cfg.train.guide_at):
            raise UserError("--guide-channels trains a guide network for autoguidance: it needs a diffusion model "
                            "and --guide-at > 0")
        if cfg.unet.cross_attention and not (cfg.model == "ddpm" and cfg.data.dataset == "shapes"
                                             and cfg.cond.conditional):
            raise UserError("--cross-attention attends over the labels of a label set: it needs a diffusion model "
                            "with --dataset shapes --conditional")
        if cfg.unet.cross_attn_resolutions and not cfg.unet.cross_attention:
            raise UserError("--cross-attn-resolutions places cross-attention layers: it needs --cross-attention")
        d = cfg.diffusion
        if d.learn_sigma and (d.objective == "edm" or d.train_levels != "uniform"):
            raise UserError("--learn-sigma trains the variance with the VLB at whole timesteps; it does not combine "
                            "with --objective edm or --train-levels lognormal")
        check_architecture(cfg)
    except UserError as e:
        if where is None:
            raise
        raise UserError(in_file(where, str(e))) from None
    return cfg

# The tiny preset keeps its EMA weights after this fraction of the run as the "bad version" for autoguidance
# (docs/recipe.md): every tiny diffusion run keeps it; a DCGAN has no use for it (build_config), and the larger
# presets are unmeasured and keep none.
GUIDE_AT = 0.25

# Named presets: only the fields that differ from the defaults above.
PRESETS = {
    # The CPU half-hour: a 30-minute time budget (--minutes 0 trains the fixed 8,000 steps instead). Why each value
    # is what it is, and what lost: the measured ablation in docs/recipe.md. Attention sits at the coarsest level
    # (ATTEND_COARSEST).
    "tiny": dict(unet=dict(base_channels=32, channel_mults=(1, 1, 2), num_res_blocks=1, attn_resolutions=(),
                           dropout=0.0),
                 diffusion=dict(timesteps=1000),
                 train=dict(steps=8000, minutes=30.0, batch_size=32, lr=1e-3, warmup=100, lr_decay="cosine",
                            ema_decay=0.999,
                            guide_at=GUIDE_AT, log_every=20, sample_every=500, save_every=500, grid_size=16,
                            grid_steps=25)),
    # A single-GPU model that trains in tens of minutes.
    "small": dict(unet=dict(base_channels=64, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                            dropout=0.1),
                  train=dict(steps=30_000, batch_size=128, lr=2e-4, warmup=500, ema_decay=0.9995)),
    # Ho et al. (2020), CIFAR-10: 35.7 M parameters.
    "ddpm-cifar": dict(unet=dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                                 attn_resolutions=(16,), dropout=0.1),
                       train=dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999)),
}


def default_preset(device_type):
    """The preset a plain `train.py` picks: `tiny` on a CPU, `small` on a GPU."""
    return "small" if device_type == "cuda" else "tiny"


def add_config_flags(parser: argparse.ArgumentParser, sections=SECTIONS):
    """One flag per config field, all defaulting to None so we can tell what the user set. Choices are shown in the
    help but checked by `validate` (check_values), so a wrong one is one line like every other bad value."""
    for name in sections:
        cls = type(getattr(RunConfig(), name))
        group = parser.add_argument_group(name)
        for f in fields(cls):
            kw = dict(default=None, dest=f"{name}.{f.name}", help=f.metadata.get("help", ""))
            if f.type is bool or isinstance(f.default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            else:
                if "nargs" in f.metadata:
                    kw["nargs"] = f.metadata["nargs"]
                    kw["type"] = f.metadata.get("type", str)
                else:
                    kw["type"] = type(f.default)
                if "choices" in f.metadata:
                    kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            group.add_argument(flag_name(f), **kw)


def user_overrides(args):
    """{section: {field: value}} for the config flags the user actually passed."""
    out = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = tuple(value) if isinstance(value, list) else value
    return out


# The presets are tuned for diffusion; a DCGAN keeps their cadence and time budget but takes the DCGAN paper's Adam
# rate and a batch of 64 (tiny's lr 1e-3 and batch 32 are diffusion choices), and 12,000 steps when the budget is
# off (docs/gan.md).
GAN_PRESET_CHANGES = {"tiny": dict(train=dict(lr=2e-4, batch_size=64, steps=12000))}


# Defaults that depend on the data: a shapes scene is lit from the upper left, so a mirrored scene is one the
# renderer never makes (its highlights on the wrong side); flips stay available with --flip. Shapes models condition
# on label sets, where the time + label embedding as a per-channel scale and shift of every block (FiLM) won
# clearly over the added embedding; on cats it tied (docs/recipe.md), so only shapes get it by default
# (--no-scale-shift-norm turns it off). Conditional shapes models also attend over one token per object of their
# label set, which followed the labels better than FiLM alone on two training seeds (docs/recipe.md, twelfth round;
# --no-cross-attention turns it off); build_config keeps it only where there is a label set.
DATASET_CHANGES = {"shapes": dict(data=dict(flip=False), unet=dict(scale_shift_norm=True, cross_attention=True))}


# Presets that add self-attention at the U-Net's coarsest level (image_size / 2**(levels − 1)) unless
# --attn-resolutions is given: a fixed size such as 8 px would not exist in the same preset at 64 px, or with other
# --channel-mults. tiny: 8 px for CIFAR's 32 px (the ablation in docs/recipe.md).
ATTEND_COARSEST = ("tiny",)

# Presets whose conditional shapes models (those with cross-attention) also cross-attend in every down- and up-path
# block one level above the coarsest, unless --cross-attn-resolutions is given (with no sizes it adds none): 16 px
# for a 32 px tiny model, where it followed the labels better within the same wall time (docs/recipe.md, fourteenth
# round). A level, not a size, as for ATTEND_COARSEST, so that it exists at any --image-size.
CROSS_ATTEND_NEXT_TO_COARSEST = ("tiny",)


def build_config(preset: str, overrides: dict, model: str = "ddpm") -> RunConfig:
    """Defaults ← preset ← (GAN changes) ← dataset changes ← user flags, then ATTEND_COARSEST, no cross-attention
    without a condition unless asked (validate then refuses it), CROSS_ATTEND_NEXT_TO_COARSEST, and, for a DCGAN, no
    autoguidance snapshot (GUIDE_AT) unless --guide-at is given (train.py then refuses it). --steps turns the
    preset's time budget off (a fixed count); --steps with --minutes is refused."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    asked = overrides.get("train", {})
    if "steps" in asked and "minutes" in asked:
        raise UserError("give --steps N (a fixed count) or --minutes M (a time budget that fixes the count), not both")
    d = RunConfig(model=model, preset=preset).to_dict()
    gan_layer = GAN_PRESET_CHANGES.get(preset, {}) if model == "dcgan" else {}
    dataset_layer = DATASET_CHANGES.get(overrides.get("data", {}).get("dataset", d["data"]["dataset"]), {})
    for layer in (PRESETS[preset], gan_layer, dataset_layer, overrides):
        for section, values in layer.items():
            d[section].update(values)
    asked_unet = overrides.get("unet", {})
    levels = len(d["unet"]["channel_mults"])
    coarsest = d["data"]["image_size"] // 2 ** max(0, levels - 1)
    if model == "ddpm" and preset in ATTEND_COARSEST and "attn_resolutions" not in asked_unet:
        d["unet"]["attn_resolutions"] = (coarsest,) if coarsest >= 1 else ()
    if not (model == "ddpm" and d["cond"]["conditional"]) and "cross_attention" not in asked_unet:
        d["unet"]["cross_attention"] = False  # the dataset default needs a label set to attend over
    if (d["unet"]["cross_attention"] and preset in CROSS_ATTEND_NEXT_TO_COARSEST and levels >= 2 and coarsest >= 1
            and "cross_attn_resolutions" not in asked_unet):
        d["unet"]["cross_attn_resolutions"] = (coarsest * 2,)
    if model != "ddpm" and "guide_at" not in asked:
        d["train"]["guide_at"] = 0.0  # autoguidance is diffusion's (GUIDE_AT)
    if "steps" in asked:
        d["train"]["minutes"] = 0.0
    return RunConfig.from_dict(d)


# Fields a resumed run may change without mixing two different runs (longer training, other logging cadence, the
# autoguidance snapshot: none of them changes the trained weights). budget.check_resume checks what a change of
# --steps, --minutes or --guide-at means for a run that already fixed its count or kept its snapshot.
RESUMABLE_FIELDS = {("train", "steps"), ("train", "minutes"), ("train", "log_every"), ("train", "sample_every"),
                    ("train", "save_every"), ("train", "grid_size"), ("train", "grid_steps"), ("train", "grid_eta"),
                    ("train", "grid_sampler"), ("train", "compile"), ("train", "guide_at"), ("data", "data_dir")}


def config_differences(a: dict, b: dict):
    """Fields (section.name) that differ between two config dicts, ignoring RESUMABLE_FIELDS."""
    diffs = []
    for section in set(a) | set(b):
        va, vb = a.get(section), b.get(section)
        if isinstance(va, dict) and isinstance(vb, dict):
            for k in set(va) | set(vb):
                x, y = va.get(k), vb.get(k)
                x = list(x) if isinstance(x, tuple) else x
                y = list(y) if isinstance(y, tuple) else y
                if x != y and (section, k) not in RESUMABLE_FIELDS:
                    diffs.append(f"{section}.{k}: {x!r} vs {y!r}")
        elif va != vb and section != "preset":
            diffs.append(f"{section}: {va!r} vs {vb!r}")
    return sorted(diffs)
