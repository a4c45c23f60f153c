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


# ------------------------------------------------------------------------------------- train.py, end to end
import json  # noqa: E402  (the sections above need none of these)
import os  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402
from tests.hang_guard import fails_instead_of_hanging  # noqa: E402
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script  # noqa: E402
from tinyddpm.config import SECTIONS, RunConfig  # noqa: E402
from tinyddpm.runfolder import MARKER  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAN_FLAGS = ["--model", "dcgan", "--preset", "tiny", "--g-channels", "8", "--d-channels", "8", "--z-dim", "8",
             "--batch-size", "4", "--log-every", "1", "--grid-size", "4", "--device", "cpu"]
KIND_FLAGS = {"ddpm": MICRO_FLAGS, "dcgan": GAN_FLAGS}


def images(tmp_path, name="imgs", seed=0):
    return make_image_folder(str(tmp_path / name), n=4, seed=seed)


def argv(data, out, *extra, kind="ddpm", steps=1):
    return ["--dataset", "folder", "--data-dir", str(data), "--image-size", "16", "--out", str(out),
            "--steps", str(steps), *KIND_FLAGS[kind], "--save-every", "1", "--sample-every", "1000", *extra]


def snapshot(folder):
    """Every file and folder below `folder` (hidden ones too): relative path → bytes, a link's target, "special" for
    a FIFO (never opened: that would block), or None for a folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), folder)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = (os.readlink(p) if os.path.islink(p) else
                                               open(p, "rb").read() if os.path.isfile(p) else "special")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One-step run folders of both kinds, copied by the tests that edit them."""
    root = tmp_path_factory.mktemp("trained")
    data = images(root)
    runs = {}
    for kind in KIND_FLAGS:
        runs[kind] = root / kind
        with open(os.devnull, "w") as null:
            stderr, sys.stderr = sys.stderr, null
            try:
                assert train.main(argv(data, runs[kind], kind=kind)) == 0
            finally:
                sys.stderr = stderr
    return data, runs


def copy_run(src, dst):
    dst.mkdir()
    for name in ("ckpt.pt", "config.json", MARKER):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def edit_checkpoint(run, edit):
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    edit(ck)
    torch.save(ck, run / "ckpt.pt")


# --- 1. one trainer per run folder; SIGKILL leaves no stale lock ---------------------------------------------
def test_second_trainer_refuses_and_a_killed_trainers_lock_is_not_stale(tmp_path, capsys):
    data, out = images(tmp_path), tmp_path / "run"
    first = argv(data, out, "--save-every", "100000", "--log-every", "1", steps=100000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *first], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until the first trainer is training (it holds the lock by then)
            if line.startswith("step "):
                break
        same = argv(data, out, "--save-every", "100000", "--log-every", "1", steps=3)
        for other in (same, argv(data, out, "--lr", "5e-4", steps=3)):  # the same config, and another one
            code, _, err = run_script(train, other, capsys)
            assert_user_error(code, err, "another trainer", f"pid {proc.pid}")
        assert proc.poll() is None  # the first one trains on, undisturbed
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    code, _, err = run_script(train, argv(data, out, "--log-every", "1", steps=2), capsys)  # the same folder again
    assert code == 0, err
    assert [json.loads(x)["step"] for x in open(out / "log.jsonl")] == [1, 2]  # the killed run's lines trimmed


# --- 2. --out: a folder of the user's is never written into ----------------------------------------------------
@pytest.mark.parametrize("theirs", [{".draft.tmp": b"mine"}, {"config.json": b'{"mine": 1}'},
                                    {"log.jsonl": b"my notes\n"}, {"photo.png": b"\x89PNG"}, {"sub/x": b"y"}])
def test_out_that_is_not_a_run_folder_is_refused_untouched(tmp_path, capsys, theirs):
    out = tmp_path / "mine"
    for name, content in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    before = snapshot(out)
    code, _, err = run_script(train, argv(images(tmp_path), out), capsys)
    assert_user_error(code, err, "not a tinyddpm run", "new or empty folder")
    assert snapshot(out) == before


def test_empty_folder_and_older_run_folders_are_accepted(tmp_path, capsys):
    data, out = images(tmp_path), tmp_path / "empty"
    out.mkdir()
    assert run_script(train, argv(data, out), capsys)[0] == 0
    assert (out / MARKER).exists()
    # A run folder written before the marker and the data fingerprint existed resumes as it always did.
    (out / MARKER).unlink()
    edit_checkpoint(out, lambda ck: ck.pop("data"))
    code, _, err = run_script(train, argv(data, out, steps=2), capsys)
    assert code == 0 and "resuming" in err and "at step 1" in err, err
    (out / "ckpt.pt").unlink()  # killed before its first checkpoint: its marker says it is a run
    code, _, err = run_script(train, argv(data, out, steps=1), capsys)
    assert code == 0, err


def test_a_copied_config_json_does_not_make_a_folder_a_run(tmp_path, capsys, trained):
    """config.json is for people to read, and people copy it: alone it never makes a folder a run (a run would
    replace the log.jsonl and delete the .tmp files beside it)."""
    data, runs = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_bytes((runs["ddpm"] / "config.json").read_bytes())
    (mine / "log.jsonl").write_text("my notes\n")
    (mine / ".draft.tmp").write_text("mine")
    before = snapshot(mine)
    code, _, err = run_script(train, argv(data, mine), capsys)
    assert_user_error(code, err, "not a tinyddpm run", "new or empty folder")
    assert snapshot(mine) == before


def test_a_temp_file_of_the_users_in_a_run_folder_is_kept(tmp_path, capsys, trained):
    data, runs = trained
    run = copy_run(runs["ddpm"], tmp_path / "run")
    (run / ".notes.tmp").write_text("mine")
    (run / ".ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what a killed write leaves
    code, _, err = run_script(train, argv(data, run, steps=2), capsys)
    assert code == 0, err
    assert (run / ".notes.tmp").read_text() == "mine" and not (run / ".ckpt.pt.abc123.tmp").exists()


def test_symlinked_out(tmp_path, capsys):
    data = images(tmp_path)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, _, err = run_script(train, argv(data, dangling), capsys)
    assert_user_error(code, err, "symlink", "does not exist")
    assert not (tmp_path / "nowhere").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    to_mine = tmp_path / "to_mine"
    to_mine.symlink_to(mine)
    code, _, err = run_script(train, argv(data, to_mine), capsys)
    assert_user_error(code, err, "not a tinyddpm run")
    assert snapshot(mine) == {"notes.txt": b"mine"}
    real, link = tmp_path / "real", tmp_path / "link"
    assert run_script(train, argv(data, real), capsys)[0] == 0
    link.symlink_to(real)
    code, _, err = run_script(train, argv(data, link, steps=2), capsys)  # a link to a run folder is that run
    assert code == 0 and "at step 1" in err, err


@pytest.mark.parametrize("inside", ["run", "a/b/run", "."])
def test_out_inside_the_image_folder_is_refused(tmp_path, capsys, inside):
    data = images(tmp_path)
    before = snapshot(data)
    code, _, err = run_script(train, argv(data, os.path.join(data, inside)), capsys)
    assert_user_error(code, err, "inside --data-dir", "training data")
    assert snapshot(data) == before


# --- 6. one damaged-checkpoint guard for both loops ------------------------------------------------------------
def _first(d):
    return next(iter(d))


DAMAGE = {
    "weights-of-another-shape": lambda ck: ck["models"][_first(ck["models"])].update(
        {_first(ck["models"][_first(ck["models"])]): torch.zeros(1)}),
    "no-data-order": lambda ck: ck.pop("sampler"),
    "empty-optimizer-state": lambda ck: ck["optimizers"].update({_first(ck["optimizers"]): {}}),
    "optimizer-moments-of-another-shape": lambda ck: [
        s.update(exp_avg=torch.zeros(7)) for s in ck["optimizers"][_first(ck["optimizers"])]["state"].values()],
    "no-rng": lambda ck: ck.pop("rng"),
    "rng-of-wrong-type": lambda ck: ck["rng"].update(train="seed"),
    "sampler-of-wrong-type": lambda ck: ck.update(sampler=[1, 2]),
    "missing-model": lambda ck: ck["models"].pop(_first(ck["models"])),
    "step-negative": lambda ck: ck.update(step=-3),
    "step-a-string": lambda ck: ck.update(step="1"),
    "labels-junk": lambda ck: ck.update(labels="cats"),
    "optimizer-lr-a-string": lambda ck: ck["optimizers"][_first(ck["optimizers"])]["param_groups"][0].update(
        lr="0.001"),
    "optimizer-betas-none": lambda ck: ck["optimizers"][_first(ck["optimizers"])]["param_groups"][0].update(
        betas=None),
    "optimizer-eps-none": lambda ck: ck["optimizers"][_first(ck["optimizers"])]["param_groups"][0].update(eps=None),
    "optimizer-beta-a-string": lambda ck: ck["optimizers"][_first(ck["optimizers"])]["param_groups"][0].update(
        betas=("0.9", 0.999)),
    # NaN in the EMA weights (a DCGAN resumed from such a file wrote a black grid and exited 0)
    "ema-weights-nan": lambda ck: [v.fill_(float("nan")) for v in ck["models"]["ema"].values()
                                   if v.is_floating_point()],
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("kind", ["ddpm", "dcgan"])
def test_damaged_checkpoint_is_one_line_for_both_loops(tmp_path, capsys, trained, kind, damage):
    data, runs = trained
    run = copy_run(runs[kind], tmp_path / "run")
    edit_checkpoint(run, DAMAGE[damage])
    before = snapshot(run)
    code, _, err = run_script(train, argv(data, run, kind=kind, steps=3), capsys)
    assert_user_error(code, err, "damaged")
    assert snapshot(run) == before


def _first_float(weights):
    return next(k for k, v in weights.items() if v.is_floating_point())


GUIDE_DAMAGE = {  # models["guide"] is {"step": int, "weights": state_dict} (ema.Snapshot)
    "no-weights": lambda g: g.pop("weights"),
    "empty-weights": lambda g: g.update(weights={}),
    "weights-of-another-shape": lambda g: g["weights"].update({_first(g["weights"]): torch.zeros(1)}),
    "a-missing-tensor": lambda g: g["weights"].pop(_first(g["weights"])),
    "nan": lambda g: g["weights"][_first_float(g["weights"])].fill_(math.nan),
    "inf": lambda g: g["weights"][_first_float(g["weights"])].fill_(math.inf),
    "step-a-string": lambda g: g.update(step="1"),
    "step-nan": lambda g: g.update(step=math.nan),
    "step-negative": lambda g: g.update(step=-1),
    "no-step": lambda g: g.pop("step"),
}


@pytest.mark.parametrize("damage", [*GUIDE_DAMAGE, "a-tensor"])
def test_damaged_autoguidance_snapshot_is_refused_on_resume(tmp_path, capsys, trained, damage):
    data, runs = trained
    run = copy_run(runs["ddpm"], tmp_path / "run")
    assert torch.load(run / "ckpt.pt", weights_only=True)["models"]["guide"]  # the one-step run kept one

    def edit(ck):
        if damage == "a-tensor":
            ck["models"]["guide"] = torch.zeros(3)
        else:
            GUIDE_DAMAGE[damage](ck["models"]["guide"])
    edit_checkpoint(run, edit)
    before = snapshot(run)
    code, _, err = run_script(train, argv(data, run, steps=3), capsys)
    assert_user_error(code, err, "damaged", "autoguidance snapshot")
    assert snapshot(run) == before


def test_a_checkpoint_without_a_snapshot_still_resumes(tmp_path, capsys, trained):
    data, runs = trained
    for name, edit in (("older", lambda ck: ck["models"].pop("guide")), ("none-yet", lambda ck: ck["models"].update(
            guide={}))):
        run = copy_run(runs["ddpm"], tmp_path / name)
        edit_checkpoint(run, edit)
        code, _, err = run_script(train, argv(data, run, steps=2), capsys)
        assert code == 0 and "at step 1" in err, err


# --- out of memory: one line naming the sizes, and a new run leaves nothing behind --------------------------------
OOM_ERRORS = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
              RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")]
MEMORY_FLAGS = {"ddpm": ["--batch-size 4", "--base-channels 32", "--channel-mults 1 1"],
                "dcgan": ["--batch-size 4", "--g-channels 8", "--d-channels 8"]}


def fail_optimizer_steps(monkeypatch, error, after=0):
    """Every optimizer step after the first `after` raises `error`, as an allocation that does not fit would."""
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise error
        return real[type(self)](self, *args, **kwargs)

    real = {cls: cls.step for cls in (torch.optim.Adam, torch.optim.AdamW)}
    for cls in real:
        monkeypatch.setattr(cls, "step", step)


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["cuda", "cpu"])
@pytest.mark.parametrize("kind", ["ddpm", "dcgan"])
def test_out_of_memory_in_a_new_run_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, kind, error):
    data, out = images(tmp_path), tmp_path / "runs" / "new"
    fail_optimizer_steps(monkeypatch, error, after=4)  # a few steps in: log lines and grids written, no checkpoint
    flags = ["--log-every", "1", "--sample-every", "1", "--save-every", "1000"]
    code, _, err = run_script(train, argv(data, out, *flags, kind=kind, steps=10), capsys)
    assert_user_error(code, err, "out of memory", *MEMORY_FLAGS[kind])
    assert not (tmp_path / "runs").exists()
    empty = tmp_path / "empty"  # a folder the user made is left, as empty as it was
    empty.mkdir()
    code, _, err = run_script(train, argv(data, empty, *flags, kind=kind, steps=10), capsys)
    assert_user_error(code, err, "out of memory")
    assert snapshot(empty) == {}


@pytest.mark.parametrize("kind", ["ddpm", "dcgan"])
def test_out_of_memory_on_resume_keeps_the_checkpoint(tmp_path, capsys, monkeypatch, trained, kind):
    data, runs = trained
    run = copy_run(runs[kind], tmp_path / "run")
    ckpt = (run / "ckpt.pt").read_bytes()
    fail_optimizer_steps(monkeypatch, OOM_ERRORS[0])
    code, _, err = run_script(train, argv(data, run, kind=kind, steps=3), capsys)
    assert_user_error(code, err, "out of memory", *MEMORY_FLAGS[kind])
    assert (run / "ckpt.pt").read_bytes() == ckpt and (run / MARKER).exists()


def test_out_of_memory_building_the_gan_is_one_line(tmp_path, capsys, monkeypatch):
    def build_gan(cfg, labels):
        raise OOM_ERRORS[1]

    monkeypatch.setattr("tinyddpm.gan_training.build_gan", build_gan)
    code, _, err = run_script(train, argv(images(tmp_path), tmp_path / "run", kind="dcgan"), capsys)
    assert_user_error(code, err, "out of memory", *MEMORY_FLAGS["dcgan"])
    assert not (tmp_path / "run").exists()


# --- the run's own files: plain files, or refused before anything changes ------------------------------------------
def _dangling(path, tmp_path):
    path.unlink()
    path.symlink_to(tmp_path / "nowhere")


def _loop(path, tmp_path):
    path.unlink()
    path.symlink_to(path.name)


def _fifo(path, tmp_path):
    path.unlink()
    os.mkfifo(path)


def _link_to_elsewhere(path, tmp_path):
    """The real file moved out of the folder, a link in its place: the run would replace the link by a file."""
    target = tmp_path / f"elsewhere-{path.name}"
    os.replace(path, target)
    path.symlink_to(target)


ODD_FILES = {"dangling-symlink": _dangling, "symlink-loop": _loop, "fifo": _fifo,
             "link-to-elsewhere": _link_to_elsewhere}


@pytest.mark.parametrize("odd", ODD_FILES)
@pytest.mark.parametrize("name", ["ckpt.pt", "log.jsonl", "config.json", MARKER])
def test_run_files_that_are_not_plain_files_are_refused(tmp_path, capsys, trained, name, odd):
    data, runs = trained
    run = copy_run(runs["ddpm"], tmp_path / "run")
    (run / "log.jsonl").write_bytes((runs["ddpm"] / "log.jsonl").read_bytes())
    ODD_FILES[odd](run / name, tmp_path)
    before, everything = snapshot(run), snapshot(tmp_path)
    with fails_instead_of_hanging():
        code, _, err = run_script(train, argv(data, run, steps=2), capsys)
    assert_user_error(code, err, name, "move it away")
    assert snapshot(run) == before and snapshot(tmp_path) == everything  # a link's target too


# --- 7. a checkpoint's config passes the same validation as the command line ------------------------------------
CONFIG_EDITS = {
    "timesteps-0": ("diffusion", "timesteps", 0), "negative-width": ("unet", "base_channels", -4),
    "unknown-schedule": ("diffusion", "schedule", "exp"), "num-heads-0": ("unet", "num_heads", 0),
    "string-for-a-list": ("unet", "channel_mults", "12"), "nan-dropout": ("unet", "dropout", float("nan")),
    "string-for-an-int": ("data", "image_size", "16"), "huge-timesteps": ("diffusion", "timesteps", 10**12),
    "skip-width": ("unet", "channel_mults", [1, 2]),  # 32 + 64 = 96 fits, but not 64 + 64 with 32 channels…
    "unknown-field": ("unet", "wings", 2), "section-not-a-table": ("unet", None, [1, 2]),
    "bool-for-an-int": ("unet", "num_res_blocks", True), "unknown-sampler": ("train", "grid_sampler", "euler"),
}


def _edit_config(name):
    section, key, value = CONFIG_EDITS[name]

    def edit(ck):
        if key is None:
            ck["config"][section] = value
        else:
            ck["config"][section][key] = value
    return edit


@pytest.mark.parametrize("name", CONFIG_EDITS)
def test_edited_checkpoint_config_is_one_line_in_sample_and_train(tmp_path, capsys, trained, name):
    data, runs = trained
    run = copy_run(runs["ddpm"], tmp_path / "run")
    if name == "skip-width":  # base 36: levels of 36 and 72 channels pass, the up path's 72 + 72 does not
        edit_checkpoint(run, lambda ck: ck["config"]["unet"].update(base_channels=36))
    edit_checkpoint(run, _edit_config(name))
    before = snapshot(run)
    code, _, err = run_script(sample, ["--ckpt", str(run / "ckpt.pt"), "--out", str(tmp_path / "s"), "--n", "1",
                                       "--device", "cpu"], capsys)
    assert_user_error(code, err, str(run / "ckpt.pt"))
    assert "damaged" in err or "edited" in err
    assert not (tmp_path / "s").exists()
    code, _, err = run_script(train, argv(data, run, steps=2), capsys)
    assert_user_error(code, err, str(run / "ckpt.pt"))
    assert snapshot(run) == before


# --- 8. shapes and values: one line, and nothing created ------------------------------------------------------
@pytest.mark.parametrize("kind, flags, words", [
    ("ddpm", ["--base-channels", "36", "--channel-mults", "1", "2"], ["GroupNorm", "--base-channels 36"]),
    ("ddpm", ["--base-channels", "1"], ["--base-channels 1"]),
    ("dcgan", ["--z-dim", "0"], ["--z-dim"]), ("dcgan", ["--g-channels", "0"], ["--g-channels"]),
    ("dcgan", ["--d-channels", "-1"], ["--d-channels"]), ("dcgan", ["--beta1", "nan"], ["--beta1"]),
    ("dcgan", ["--beta1", "2"], ["--beta1"]), ("dcgan", ["--image-size", "24"], ["power of two"]),
    ("ddpm", ["--grid-sampler", "euler"], ["--grid-sampler"]),
])
def test_bad_network_shapes_are_refused_before_anything_is_created(tmp_path, capsys, kind, flags, words):
    data = images(tmp_path)
    code, _, err = run_script(train, argv(data, tmp_path / "run", *flags, kind=kind), capsys)
    assert_user_error(code, err, *words)
    assert not (tmp_path / "run").exists()


def _flag_cases():
    """Every numeric flag of train.py with non-finite (floats) or out-of-64-bit (ints) values."""
    cases = []
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(RunConfig(), section)):
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            if f.type is float:  # "--lr=-inf": argparse would read a bare "-inf" as a flag
                cases += [(flag, [f"{flag}={v}"]) for v in ("nan", "inf", "-inf", "1e999")]
            elif f.type is int:
                cases += [(flag, [f"{flag}={v}"]) for v in (2**63, -2**63 - 1, 10**40)]
            elif f.metadata.get("type") is int:
                cases += [(flag, [flag, "1", str(2**64)])]
    return cases


@pytest.mark.parametrize("flag, flags", _flag_cases())
def test_every_numeric_flag_refuses_nonfinite_and_huge_values(tmp_path, capsys, flag, flags):
    code, _, err = run_script(train, argv(tmp_path / "imgs", tmp_path / "run", *flags), capsys)
    assert_user_error(code, err, flag)
    assert not (tmp_path / "run").exists()


# --- 12. a CIFAR batch whose labels and images differ in length -------------------------------------------------
def test_cifar_batch_with_more_images_than_labels(tmp_path, capsys):
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n_labels = 2 if name == "data_batch_3" else 3
        batch = {"data": rng.integers(0, 256, (3, 3072)).tolist(), "labels": [3] * n_labels}  # plain lists
        with open(batches / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    code, _, err = run_script(train, ["--dataset", "cifar", "--data-dir", str(tmp_path / "cifar"), "--class", "cat",
                                      "--out", str(tmp_path / "run"), *MICRO_FLAGS, "--steps", "1"], capsys)
    assert_user_error(code, err, "data_batch_3", "3 images but 2 labels")
    assert not (tmp_path / "run").exists()


# --- 13. resuming on other data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ddpm", "dcgan"])
def test_resume_on_other_images_of_the_same_count_is_refused(tmp_path, capsys, kind):
    a, b, out = images(tmp_path, "a", seed=0), images(tmp_path, "b", seed=1), tmp_path / "run"
    assert run_script(train, argv(a, out, kind=kind), capsys)[0] == 0
    before = snapshot(out)
    code, _, err = run_script(train, argv(b, out, kind=kind, steps=2), capsys)
    assert_user_error(code, err, "other data", "4 images")
    assert snapshot(out) == before
    code, _, err = run_script(train, argv(a, out, kind=kind, steps=2), capsys)  # the same images elsewhere: fine
    assert code == 0, err


# --- signals and odd files at every write -----------------------------------------------------------------------
@pytest.mark.parametrize("target", ["ckpt.pt", ".png"])
def test_sigterm_during_a_write_finishes_it_then_stops_with_a_checkpoint(tmp_path, capsys, monkeypatch, target):
    data, out = images(tmp_path), tmp_path / "run"
    real_replace, sent = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(target) and not sent:
            sent.append(dst)
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_script(train, argv(data, out, "--sample-every", "2", "--save-every", "2", steps=50), capsys)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    monkeypatch.setattr(os, "replace", real_replace)
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step in (2, 3)
    code, _, err = run_script(train, argv(data, out, "--sample-every", "2", "--save-every", "2", steps=4), capsys)
    assert code == 0 and f"at step {step}" in err, err


def test_second_ctrl_c_inside_a_checkpoint_write_keeps_the_last_one_and_releases_the_lock(tmp_path, capsys,
                                                                                        monkeypatch):
    data, out = images(tmp_path), tmp_path / "run"
    assert run_script(train, argv(data, out), capsys)[0] == 0
    good = (out / "ckpt.pt").read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("ckpt.pt"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second one stops at once
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_script(train, argv(data, out, steps=3), capsys)
    assert code == 130, err
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "ckpt.pt").read_bytes() == good
    code, _, err = run_script(train, argv(data, out, steps=3), capsys)  # no stale lock; temp files cleaned
    assert code == 0 and "at step 1" in err, err
    assert not list(out.rglob(".*.tmp"))


@pytest.mark.parametrize("odd", ["log-is-a-folder", "ckpt-is-a-folder"])
def test_odd_files_in_the_run_folder_are_one_line(tmp_path, capsys, trained, odd):
    data, runs = trained
    run = copy_run(runs["ddpm"], tmp_path / "run")
    if odd == "log-is-a-folder":
        (run / "log.jsonl").mkdir()
    else:
        (run / "ckpt.pt").unlink()
        (run / "ckpt.pt").mkdir()
    before = snapshot(run)
    code, _, err = run_script(train, argv(data, run, steps=2), capsys)
    assert_user_error(code, err, "log.jsonl" if odd == "log-is-a-folder" else "ckpt.pt")
    assert snapshot(run) == before
