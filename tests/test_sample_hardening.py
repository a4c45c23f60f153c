"""sample.py under attack, in every mode (default, --fuse, --interpolate, --report with a stand-in Inception,
--bpd, --eval-labels), and the --device flag of all three scripts.

Each class of case: non-finite, out-of-range and huge values; weights or samples that are NaN (refused, nothing
written); no --ckpt (the newest run, or one line); an output folder that cannot be made (a file in the way, a broken
or looping symlink, /proc) and one that is a symlink or has a non-UTF-8 name; signals while PNGs are written (real
subprocesses); output that streams (memory flat in --n); devices torch knows but tinyddpm does not run on; 8-bit
pixels. A refusal is one line on stderr, exit code 2, no traceback, nothing created.
"""
import os
import signal
import subprocess
import sys
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tests.test_report import FakeInception
from tinyddpm import evaluator as ev
from tinyddpm import files
from tinyddpm.errors import UserError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNCREATABLE = "/proc/tinyddpm-no-such-dir/out"  # cannot be created even by root
NON_UTF8 = os.fsdecode(b"out-\xff\xfe-latin1-\xe9")  # a folder name that is not UTF-8 (lone surrogates in Python)
SIGNAL_WAIT_S = 120  # generous: the shared CI machine may be slow to start torch


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A 1-step unconditional folder model (16 px), a 1-step shapes model (32 px, multi-label), an untrained 32 px
    evaluator and two input images."""
    root = tmp_path_factory.mktemp("hard")
    imgs = make_image_folder(str(root / "imgs"), n=4, size=16)
    for name, flags in (("plain", ["--dataset", "folder", "--data-dir", imgs, "--image-size", "16"]),
                        ("shapes", ["--dataset", "shapes", "--conditional", "--shapes-count", "8",
                                    "--image-size", "32"])):
        assert run_cli(train.main, ["--out", str(root / name), "--steps", "1", *flags, *MICRO_FLAGS,
                                    "--sample-every", "1000", "--save-every", "1000"]) == 0
    torch.manual_seed(0)
    ev.save_evaluator(ev.Evaluator(32), root / "ev32.pt")
    return SimpleNamespace(root=root, imgs=imgs, plain=str(root / "plain" / "ckpt.pt"),
                           shapes=str(root / "shapes" / "ckpt.pt"), ev32=str(root / "ev32.pt"),
                           a=os.path.join(imgs, "img0.png"), b=os.path.join(imgs, "img1.png"))


# Each mode: the checkpoint it runs on and the flags that make it a valid command (before the case's own flags).
MODES = {
    "default": ("shapes", lambda w: ["--steps", "1", "--labels", "red cube"]),
    "fuse": ("shapes", lambda w: ["--steps", "1", "--fuse", w.a, w.b, "--labels", "red cube"]),
    "interpolate": ("shapes", lambda w: ["--steps", "1", "--interpolate", w.a, w.b, "--frames", "2",
                                         "--labels", "red cube"]),
    "report": ("plain", lambda w: ["--steps", "1", "--report", "--ref", w.imgs, "--n", "2",
                                   "--cache-dir", str(w.root / "cache")]),
    "eval-labels": ("shapes", lambda w: ["--steps", "1", "--eval-labels", "--evaluator", w.ev32, "--n-sets", "1"]),
    "bpd": ("plain", lambda w: ["--bpd", "--n", "2"]),
}
WRITING_MODES = [m for m in MODES if m != "bpd"]


def argv_for(w, mode, out, *extra):
    ckpt, flags = MODES[mode]
    return ["--ckpt", getattr(w, ckpt), "--out", str(out), "--device", "cpu", *flags(w), *extra]


@pytest.fixture
def fake_inception(monkeypatch):
    model = FakeInception()
    monkeypatch.setattr("tinyddpm.inception.load_inception", lambda weights=None, device="cpu": model)
    return model


def tree(root):
    """Every path below root (bytes, so non-UTF-8 names compare too)."""
    return sorted(os.path.join(d, n) for d, ds, fs in os.walk(os.fsencode(root)) for n in ds + fs)


# ------------------------------------------------------------------------------------------------ values
# (flags, words the error line must hold, modes where the case does not apply)
NOT_SAMPLED = {"bpd"}  # --bpd samples nothing: the sampling flags are refused as not applying, tested below
NO_N = {"interpolate", "eval-labels"}  # their image count comes from --frames / --n-per-set × --n-sets
UNCONDITIONAL = {"report", "bpd"}  # cases about guidance need a conditional model
VALUE_CASES = [
    (["--eta", "nan"], ["--eta", "finite"], NOT_SAMPLED),
    (["--eta", "inf"], ["--eta", "finite"], NOT_SAMPLED),
    (["--eta=-inf"], ["--eta", "finite"], NOT_SAMPLED),
    (["--eta", "1.5"], ["--eta", "between 0"], NOT_SAMPLED),  # σ² would exceed 1 − ᾱ_prev (issue 16, defect 2)
    (["--cfg-scale", "nan"], ["--cfg-scale", "finite"], NOT_SAMPLED | UNCONDITIONAL),
    (["--cfg-scale", "inf"], ["--cfg-scale", "finite"], NOT_SAMPLED | UNCONDITIONAL),
    (["--cfg-scale", "1e400"], ["--cfg-scale", "finite"], NOT_SAMPLED | UNCONDITIONAL),  # parses as inf
    (["--steps", "0"], ["--steps", "at least 1"], NOT_SAMPLED),
    (["--steps", str(10**30)], ["--steps", "64-bit"], NOT_SAMPLED),
    (["--seed", "-1"], ["--seed", "between 0"], set()),
    (["--seed", str(2**64)], ["--seed", "64-bit"], set()),
    (["--seed", str(2**63 - 1), "--n", "2"], ["--seed", "largest seed"], NO_N),
    (["--n", str(10**30)], ["--n", "64-bit"], NO_N),
    (["--n", "-5"], ["--n", "at least 1"], NO_N),
    (["--batch-size", str(10**9)], ["--batch-size", "between 1"], set()),
    (["--batch-size", "0"], ["--batch-size", "between 1"], set()),
    (["--churn", "nan"], ["--churn", "finite"], NOT_SAMPLED),
    (["--sampler", "heun", "--churn", "inf"], ["--churn", "finite"], NOT_SAMPLED | {"interpolate"}),
    (["--sampler", "dpmpp-2m", "--eta", "0.5"], ["--eta applies only to the ddim sampler"],
     NOT_SAMPLED | {"interpolate"}),
    (["--churn", "1"], ["--churn applies only to the heun sampler"], NOT_SAMPLED | {"interpolate"}),
    # ddpm takes every timestep: a --steps it would ignore is refused, and the line says what to use instead
    (["--sampler", "ddpm", "--steps", "10"], ["ddpm", "--steps does not apply", "--sampler ddim --steps 10"],
     NOT_SAMPLED),
    # the micro models have T = 100 timesteps: at most 2·T = 200 model calls (Heun's 2n − 1 over every level)
    (["--steps", "201"], ["--steps 201", "100 timesteps", "at most 200"], NOT_SAMPLED),
    (["--sampler", "heun", "--steps", str(2**40)], ["--steps", "at most 200"], NOT_SAMPLED | {"interpolate"}),
]
VALUE_MATRIX = [(mode, flags, words) for flags, words, skip in VALUE_CASES for mode in MODES if mode not in skip]


@pytest.mark.parametrize("mode, flags, words", VALUE_MATRIX,
                         ids=[f"{m}:{' '.join(f)[:40]}" for m, f, _ in VALUE_MATRIX])
def test_sampling_values_are_checked_once_for_every_mode(w, tmp_path, capsys, mode, flags, words):
    out = tmp_path / "out"
    code, _, err = run_script(sample, argv_for(w, mode, out, *flags), capsys)
    assert_user_error(code, err, *words)
    assert not out.exists()


@pytest.mark.parametrize("flags, words", [
    (["--eta", "1"], ["--eta", "do not apply to --bpd"]),
    (["--steps", "3"], ["--steps", "do not apply to --bpd"]),
    (["--sampler", "ddpm"], ["--sampler", "do not apply to --bpd"]),
])
def test_bpd_refuses_sampling_flags_it_would_ignore(w, tmp_path, capsys, flags, words):
    argv = ["--ckpt", w.plain, "--bpd", "--n", "2", "--device", "cpu", *flags]
    code, _, err = run_script(sample, argv, capsys)
    assert_user_error(code, err, *words)


@pytest.mark.parametrize("mode, flags, words", [
    ("eval-labels", ["--n", "5"], ["--n does not apply", "--n-per-set"]),
    ("eval-labels", ["--n-per-set", "101"], ["--n-per-set", "between 1"]),
    ("eval-labels", ["--cfg-sweep", "1", "inf"], ["finite"]),
    ("eval-labels", ["--cfg-sweep", "nan"], ["finite"]),
    ("interpolate", ["--frames", "1001"], ["--frames", "between 2"]),
    ("interpolate", ["--eta", "0.5"], ["deterministic"]),
    ("interpolate", ["--spacing", "karras"], ["deterministic", "--spacing"]),
    ("fuse", ["--t", str(10**30)], ["--t", "1 … 100"]),
    ("fuse", ["--lam", "inf"], ["--lam", "finite"]),
])
def test_mode_values_huge_and_non_finite(w, tmp_path, capsys, mode, flags, words):
    out = tmp_path / "out"
    code, _, err = run_script(sample, argv_for(w, mode, out, *flags), capsys)
    assert_user_error(code, err, *words)
    assert not out.exists()


def test_steps_up_to_twice_the_timesteps_are_sampled(w, tmp_path, capsys):
    """2·T model calls is the largest --steps, and it is accepted (the refusal above is not off by one)."""
    code, stdout, err = run_script(sample, argv_for(w, "default", tmp_path / "out", "--steps", "200", "--n", "1",
                                                    "--sampler", "heun"), capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["000000.png", "grid.png"]


# ------------------------------------------------------------------------------------------------ non-finite
def _with_nan_weights(src, dst, entry):
    """A copy of checkpoint `src` with one NaN in its `entry` weights ("ema", "model" or "guide")."""
    from tinyddpm.checkpoint import load_checkpoint
    from tinyddpm.files import atomic_torch_save

    ck = load_checkpoint(src)
    ck.pop("run_config", None)  # added on load; not part of the file
    state = ck["models"][entry]["weights"] if entry == "guide" else ck["models"][entry]
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    atomic_torch_save(ck, dst)
    return str(dst)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A class-conditional (cat, frog) checkpoint with an autoguidance snapshot, made from seeds, and two inputs."""
    from tests.same_images import fixed_checkpoint, input_images

    root = tmp_path_factory.mktemp("seeded")
    a, b = input_images(str(root / "inputs"))
    return SimpleNamespace(root=root, cond=fixed_checkpoint(str(root / "cond.pt"), conditional=True), a=a, b=b)


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_ema_weights_are_refused_on_load(w, tmp_path, capsys, fake_inception, mode):
    ckpt = _with_nan_weights(getattr(w, MODES[mode][0]), tmp_path / "nan.pt", "ema")
    argv = argv_for(w, mode, tmp_path / "out")
    argv[argv.index("--ckpt") + 1] = ckpt
    code, stdout, err = run_script(sample, argv, capsys)
    assert_user_error(code, err, "nan.pt", "EMA weights hold NaN or inf")
    assert not (tmp_path / "out").exists() and stdout == "" and fake_inception.seen == 0


def test_nan_weights_refused_only_where_they_are_used(w, seeded, tmp_path, capsys):
    """NaN in the EMA weights: --raw (the raw weights) still samples. NaN in the autoguidance snapshot: refused."""
    ckpt = _with_nan_weights(w.plain, tmp_path / "nan-ema.pt", "ema")
    code, _, err = run_script(sample, ["--ckpt", ckpt, "--raw", "--n", "1", "--steps", "1", "--out",
                                       str(tmp_path / "raw"), "--device", "cpu"], capsys)
    assert code == 0, err
    raw = _with_nan_weights(w.plain, tmp_path / "nan-raw.pt", "model")
    code, _, err = run_script(sample, ["--ckpt", raw, "--raw", "--n", "1", "--out", str(tmp_path / "o"),
                                       "--device", "cpu"], capsys)
    assert_user_error(code, err, "raw weights hold NaN")
    guide = _with_nan_weights(seeded.cond, tmp_path / "nan-guide.pt", "guide")
    code, _, err = run_script(sample, ["--ckpt", guide, "--class", "cat", "--n", "1", "--out", str(tmp_path / "o"),
                                       "--device", "cpu"], capsys)
    assert_user_error(code, err, "autoguidance snapshot", "holds NaN or inf")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", WRITING_MODES)
def test_a_network_that_gives_nan_writes_nothing(w, tmp_path, capsys, fake_inception, monkeypatch, mode):
    """Whatever makes the network's output NaN, no mode writes an image of it (nor a grid, strip or report)."""
    from tinyddpm.generate import LoadedModel

    real = LoadedModel.network_fn

    def nan_network(self, *a, **kw):
        fn = real(self, *a, **kw)
        return lambda x, t: fn(x, t) * float("nan")

    monkeypatch.setattr(LoadedModel, "network_fn", nan_network)
    code, stdout, err = run_script(sample, argv_for(w, mode, tmp_path / "out"), capsys)
    assert_user_error(code, err, "NaN or inf", "nothing of it was written")
    assert not (tmp_path / "out").exists() and "wrote" not in stdout


@pytest.mark.parametrize("mode", ["default", "fuse", "interpolate"])
def test_guidance_that_overflows_exits_without_writing(seeded, tmp_path, capsys, mode):
    """--cfg-scale 1e30 --no-clip on a conditional model overflows to inf and NaN: one line, exit 2, no PNG."""
    flags = {"default": ["--n", "2"], "fuse": ["--fuse", seeded.a, seeded.b],
             "interpolate": ["--interpolate", seeded.a, seeded.b, "--frames", "2"]}[mode]
    out = tmp_path / "out"
    code, stdout, err = run_script(sample, ["--ckpt", seeded.cond, "--class", "cat", "--cfg-scale", "1e30",
                                            "--no-clip", "--steps", "2", "--out", str(out), "--device", "cpu",
                                            *flags], capsys)
    assert_user_error(code, err, "NaN or inf", "--cfg-scale")
    assert not out.exists() and "wrote" not in stdout


def test_bpd_of_one_image_prints_no_nan(w, capsys):
    """One image has no standard error: the line gives the mean alone, never "± nan"."""
    code, stdout, err = run_script(sample, ["--ckpt", w.plain, "--bpd", "--n", "1", "--device", "cpu"], capsys)
    assert code == 0, err
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("bits/dim:")]
    value = float(line.split()[1])
    assert np.isfinite(value) and value > 0 and "nan" not in (stdout + err).lower() and "1 test image," in line
    code, stdout, err = run_script(sample, ["--ckpt", w.plain, "--bpd", "--n", "2", "--device", "cpu"], capsys)
    assert code == 0 and " ± " in stdout and "nan" not in stdout.lower(), stdout + err  # two images have a spread


# ------------------------------------------------------------------------------------------------ no --ckpt
def test_without_ckpt_the_newest_run_is_used(w, seeded, tmp_path, capsys, monkeypatch):
    """sample.py without --ckpt takes the most recently written runs/*/ckpt.pt and says which on stderr."""
    import shutil

    from tests.same_images import fixed_checkpoint

    monkeypatch.chdir(tmp_path)
    for name, src in (("a", w.plain), ("b", None)):  # a: the 16 px folder model; b: a 32 px seeded one
        os.makedirs(tmp_path / "runs" / name)
        if src:
            shutil.copy(src, tmp_path / "runs" / name / "ckpt.pt")
        else:
            fixed_checkpoint(str(tmp_path / "runs" / name / "ckpt.pt"))
    (tmp_path / "runs" / "notes").mkdir()  # a folder without a checkpoint is passed over
    for newest, older, size in (("b", "a", 32), ("a", "b", 16)):
        os.utime(tmp_path / "runs" / older / "ckpt.pt", (1_000_000_000, 1_000_000_000))
        os.utime(tmp_path / "runs" / newest / "ckpt.pt", (2_000_000_000, 2_000_000_000))
        out = tmp_path / f"out-{newest}"
        code, _, err = run_script(sample, ["--n", "1", "--steps", "1", "--out", str(out), "--device", "cpu"], capsys)
        assert code == 0, err
        assert f"using {os.path.join('runs', newest, 'ckpt.pt')}" in err, err
        assert os.path.join("runs", older) not in err
        assert Image.open(out / "000000.png").size == (size, size)  # and it is that checkpoint that sampled


@pytest.mark.parametrize("runs", ["none", "empty", "no checkpoint"])
def test_without_ckpt_and_without_a_run_is_one_line(tmp_path, capsys, monkeypatch, runs):
    monkeypatch.chdir(tmp_path)
    if runs != "none":
        os.makedirs(tmp_path / "runs" / "half" if runs == "no checkpoint" else tmp_path / "runs")
    before = tree(tmp_path)
    code, stdout, err = run_script(sample, ["--n", "1", "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert_user_error(code, err, "no --ckpt given", "train.py", "--ckpt runs/")
    assert tree(tmp_path) == before and stdout == ""


# ------------------------------------------------------------------------------------------------ output folder
def _uncreatable(tmp_path, kind):
    """An --out that cannot become a folder, and the user's file that must survive (or None)."""
    user_file = tmp_path / "notes.txt"
    user_file.write_text("the user's notes")
    if kind == "file":
        return str(user_file), user_file
    if kind == "under-a-file":
        return str(user_file / "sub"), user_file
    if kind == "broken-symlink":
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        return str(tmp_path / "link"), user_file
    if kind == "symlink-loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        return str(tmp_path / "loop"), user_file
    return UNCREATABLE, user_file


OUT_CASES = [("file", "is a file"), ("under-a-file", "cannot create"), ("broken-symlink", "broken symbolic link"),
             ("symlink-loop", "broken symbolic link"), ("proc", "cannot create")]


@pytest.mark.parametrize("mode", WRITING_MODES)
@pytest.mark.parametrize("kind, words", OUT_CASES, ids=[k for k, _ in OUT_CASES])
def test_uncreatable_out_is_one_line_in_every_mode(w, tmp_path, capsys, fake_inception, mode, kind, words):
    out, user_file = _uncreatable(tmp_path, kind)
    before = tree(tmp_path)
    code, _, err = run_script(sample, argv_for(w, mode, out), capsys)
    assert_user_error(code, err, words)
    assert tree(tmp_path) == before and user_file.read_text() == "the user's notes"
    assert fake_inception.seen == 0  # refused before the slow work


@pytest.mark.parametrize("mode", WRITING_MODES)
def test_out_may_be_a_symlink_to_a_folder(w, tmp_path, capsys, fake_inception, mode):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = run_script(sample, argv_for(w, mode, tmp_path / "link"), capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "real") and os.path.islink(tmp_path / "link")


@pytest.mark.parametrize("mode", WRITING_MODES)
def test_default_out_never_overwrites_an_earlier_run(w, tmp_path, capsys, fake_inception, monkeypatch, mode):
    """Without --out, a second run writes to samples-2/ and leaves the first run's samples/ as it was."""
    monkeypatch.chdir(tmp_path)
    argv = [a for a in argv_for(w, mode, "unused") if a not in ("--out", "unused")]
    assert run_script(sample, argv, capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "samples").iterdir()}
    assert first and not (tmp_path / "samples-2").exists()
    code, stdout, err = run_script(sample, argv, capsys)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "samples").iterdir()} == first
    assert sorted(os.listdir(tmp_path / "samples-2")) == sorted(first) and "samples-2" in stdout + err


def test_unused_folder_skips_files_and_full_folders(tmp_path):
    base = tmp_path / "samples"
    assert files.unused_folder(str(base)) == str(base)
    base.mkdir()
    assert files.unused_folder(str(base)) == str(base)  # empty: nothing to lose
    (base / "a.png").write_bytes(b"x")
    (tmp_path / "samples-2").write_bytes(b"a file")
    assert files.unused_folder(str(base)) == str(tmp_path / "samples-3")


@pytest.mark.parametrize("mode", WRITING_MODES)
def test_non_utf8_out_folder(w, tmp_path, capsys, fake_inception, mode):
    """A folder name that is not UTF-8 is written to, and the messages that name it print (escaped)."""
    out = os.path.join(str(tmp_path), NON_UTF8)
    code, stdout, err = run_script(sample, argv_for(w, mode, out), capsys)
    assert code == 0 and "Traceback" not in err, err
    assert os.listdir(os.fsencode(out)) and "\\udcff" in stdout + err


def test_non_utf8_and_symlinked_inputs(w, tmp_path, capsys):
    """Fusion inputs and the checkpoint through a symlink and a non-UTF-8 name; a dangling input is one line."""
    odd = os.path.join(str(tmp_path), os.fsdecode(b"\xe9t\xe9.png"))
    os.symlink(w.a, odd)
    ckpt = tmp_path / "ckpt-link.pt"
    ckpt.symlink_to(w.shapes)
    base = ["--ckpt", str(ckpt), "--steps", "1", "--device", "cpu", "--labels", "red cube"]
    code, _, err = run_script(sample, base + ["--fuse", odd, w.b, "--out", str(tmp_path / "f")], capsys)
    assert code == 0, err
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    code, _, err = run_script(sample, base + ["--fuse", str(tmp_path / "gone.png"), w.b,
                                              "--out", str(tmp_path / "g")], capsys)
    assert_user_error(code, err, "gone.png", "does not exist")
    assert not (tmp_path / "g").exists()


# ------------------------------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, MemoryError, RuntimeError])
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_atomic_write_removes_its_temp_file_on_any_exception(tmp_path, monkeypatch, exc, where):
    path = tmp_path / "a.png"
    path.write_bytes(b"old")

    def boom(*a, **kw):
        raise exc()

    monkeypatch.setattr(os, where, boom)
    with pytest.raises(exc):
        files.atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["a.png"] and path.read_bytes() == b"old"


def test_a_disk_error_is_still_one_user_error(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="No space left"):
        files.atomic_write_bytes(tmp_path / "a.png", b"new")
    assert os.listdir(tmp_path) == []


# The child makes every fsync announce itself and then hang, so the parent's signal lands inside a write.
CHILD = r"""
import os, signal, sys, time
sys.path.insert(0, os.getcwd())
# As in a terminal: a job that a non-interactive shell started with & inherits SIGINT *ignored* (so Python installs
# no KeyboardInterrupt handler), which would make this test hang when the suite itself runs in the background.
signal.signal(signal.SIGINT, signal.default_int_handler)

def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(600)

os.fsync = slow_fsync
import sample
from tinyddpm.errors import run_cli
sys.exit(run_cli(sample.main, sys.argv[1:]))
"""


@pytest.mark.parametrize("mode, sig, code, word", [("default", signal.SIGINT, 130, "interrupted"),
                                                   ("fuse", signal.SIGTERM, 143, "terminated")],
                         ids=["default-SIGINT", "fuse-SIGTERM"])
def test_signal_during_a_png_write_leaves_no_temp_file(w, tmp_path, mode, sig, code, word):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv_for(w, mode, out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        assert any(n.endswith(".tmp") for n in os.listdir(out))  # caught inside the write
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=SIGNAL_WAIT_S)
    finally:
        proc.kill()
    assert proc.returncode == code and "Traceback" not in err and err.strip().splitlines()[-1] == word, err
    assert not out.exists()  # the first write was interrupted: no temp file, and the empty folder is gone too


# ------------------------------------------------------------------------------------------------ streaming
def _fast_sampler(monkeypatch, calls):
    """LoadedModel.sample → grey images at once, counting calls (the network is not what is under test)."""
    from tinyddpm.generate import LoadedModel

    def fake(self, seeds, cond, options, x_start=None, t_start=None):
        calls.append(len(seeds))
        return torch.zeros(len(seeds), 3, self.image_size, self.image_size)

    monkeypatch.setattr(LoadedModel, "sample", fake)


def test_generation_is_lazy(w):
    from tinyddpm.generate import LoadedModel, SamplingOptions

    gen, calls = LoadedModel(w.plain, torch.device("cpu")), []
    opts = SamplingOptions(n=10**9, batch_size=4).check(gen)
    assert isinstance(opts.seeds(), range) and len(opts.seeds()) == 10**9
    gen.sample = lambda seeds, cond, options, **kw: calls.append(list(seeds)) or torch.zeros(len(seeds), 3, 16, 16)
    batches = gen.batches(None, opts)
    assert calls == []  # nothing is made until asked for
    seeds, images = next(batches)
    assert calls == [[0, 1, 2, 3]] and list(seeds) == [0, 1, 2, 3] and images.shape == (4, 16, 16, 3)


def test_each_batch_is_written_before_the_next_is_made(w, tmp_path, capsys, monkeypatch):
    calls, writes = [], []
    _fast_sampler(monkeypatch, calls)
    real = files.atomic_save_image
    monkeypatch.setattr("tinyddpm.imageio.atomic_save_image",
                        lambda img, path: writes.append((os.path.basename(path), len(calls))) or real(img, path))
    argv = ["--ckpt", w.plain, "--n", "10", "--batch-size", "4", "--out", str(tmp_path / "o"), "--device", "cpu"]
    code, _, err = run_script(sample, argv, capsys)
    assert code == 0, err
    made_before = dict(writes)
    assert calls == [4, 4, 2]
    assert made_before["000000.png"] == 1 and made_before["000004.png"] == 2 and made_before["000009.png"] == 3
    assert Image.open(tmp_path / "o" / "grid.png").size == (2 + 4 * 18, 2 + 3 * 18)  # all 10: 4 columns, 3 rows


def test_a_billion_images_stream_in_flat_memory(w, tmp_path, capsys, monkeypatch):
    """--n 10**9: no list of seeds, no array of every image. Ctrl-C after two batches stops cleanly."""
    calls, written = [], []
    _fast_sampler(monkeypatch, calls)
    real = files.atomic_save_image

    def save(img, path):
        if len(written) == 8:
            raise KeyboardInterrupt
        written.append(path)
        real(img, path)

    monkeypatch.setattr("tinyddpm.imageio.atomic_save_image", save)
    argv = ["--ckpt", w.plain, "--n", str(10**9), "--batch-size", "4", "--out", str(tmp_path / "o"), "--device", "cpu"]
    tracemalloc.start()
    try:
        code, _, err = run_script(sample, argv, capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert calls == [4, 4, 4] and len(written) == 8  # the third batch was made, its first write interrupted
    assert peak < 64 * 2**20, peak  # a list of 10**9 seeds alone would be gigabytes
    assert sorted(os.listdir(tmp_path / "o")) == [f"{i:06d}.png" for i in range(8)]  # no .tmp either


def test_fusion_streams_seed_by_seed(w, tmp_path, capsys, monkeypatch):
    """--fuse --n 10**9: each seed's fusion and strip are written as its batch is made; Ctrl-C stops cleanly."""
    calls, written = [], []
    _fast_sampler(monkeypatch, calls)
    real = files.atomic_save_image

    def save(img, path):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(os.path.basename(path))
        real(img, path)

    monkeypatch.setattr("tinyddpm.imageio.atomic_save_image", save)
    tracemalloc.start()
    try:
        code, _, err = run_script(sample, argv_for(w, "fuse", tmp_path / "o", "--n", str(10**9), "--batch-size", "2"),
                                  capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 130, err
    assert calls == [2, 2] and peak < 64 * 2**20, (calls, peak)
    assert written == ["fused_seed000000_lam0.5.png", "strip_seed000000.png", "fused_seed000001_lam0.5.png",
                       "strip_seed000001.png"]


def test_grid_is_the_first_images(w, tmp_path, capsys, monkeypatch):
    calls = []
    _fast_sampler(monkeypatch, calls)
    argv = ["--ckpt", w.plain, "--n", "70", "--batch-size", "32", "--out", str(tmp_path / "o"), "--device", "cpu"]
    code, _, err = run_script(sample, argv, capsys)
    assert code == 0, err
    assert len(os.listdir(tmp_path / "o")) == 71
    assert Image.open(tmp_path / "o" / "grid.png").size == (2 + 8 * 18, 2 + 8 * 18)  # 64 = 8 × 8


# ------------------------------------------------------------------------------------------------ devices
DEVICES = [("mps", "not supported"), ("xla", "not supported"), ("meta", "not supported"), ("cpu:1", "not supported"),
           ("garbage", "unknown device"), ("", "unknown device"), ("cuda:x", "unknown device")]
if not torch.cuda.is_available():
    DEVICES += [("cuda", "--device cpu"), ("cuda:3", "--device cpu")]


def _device_argv(w, script, out, device):
    if script == "sample":
        return ["--ckpt", w.plain, "--out", str(out), "--n", "1", "--steps", "1", "--device", device]
    if script == "fid":
        return [w.imgs, w.imgs, "--device", device]
    return ["--dataset", "folder", "--data-dir", w.imgs, "--image-size", "16", "--out", str(out), *MICRO_FLAGS,
            "--steps", "1", "--device", device]


@pytest.mark.parametrize("script", ["sample", "fid", "train"])
@pytest.mark.parametrize("device, words", DEVICES, ids=[d or "empty" for d, _ in DEVICES])
def test_devices_tinyddpm_does_not_run_on_are_one_line(w, tmp_path, capsys, script, device, words):
    module = {"sample": sample, "fid": fid, "train": train}[script]
    code, _, err = run_script(module, _device_argv(w, script, tmp_path / "out", device), capsys)
    assert_user_error(code, err, words)
    assert os.listdir(tmp_path) == []


def test_cpu_zero_is_the_cpu():
    from tinyddpm.devices import resolve_device

    assert resolve_device("cpu:0") == resolve_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------------------ 8-bit pixels
def test_pixels_round_clip_and_round_trip():
    """Float images become 8-bit pixels rounded and clipped (to_uint8, layout kept; to_pixels: [B, H, W, C] numpy,
    what is written), and every 8-bit level read as data (data.to_float) comes back as itself."""
    from tinyddpm import data, imageio

    x = torch.tensor([[[[-3.0, -1.0], [0.0, 1.0]]]]).expand(1, 3, 2, 2)
    assert imageio.to_uint8(x).shape == (1, 3, 2, 2) and imageio.to_uint8(x)[0, 0].flatten().tolist() == [0, 0, 128, 255]
    assert imageio.to_pixels(x).shape == (1, 2, 2, 3) and isinstance(imageio.to_pixels(x), np.ndarray)
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    assert torch.equal(data.to_uint8(data.to_float(levels)), levels)


@pytest.mark.parametrize("mode", [[], ["--report", "--n", "2"], ["--fuse", "{a}", "{b}"]])
def test_an_explicit_out_that_holds_files_is_refused_and_left_alone(seeded, tmp_path, capsys, mode):
    """A user's folder with 000000.png, grid.png or report.json in it: nothing of it is overwritten."""
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("000000.png", "grid.png", "report.json", "notes.txt"):
        (out / name).write_bytes(b"the user's own file")
    argv = ["--ckpt", seeded.cond, "--class", "cat", "--out", str(out), "--device", "cpu",
            *[m.format(a=seeded.a, b=seeded.b) for m in mode]]
    code, _, err = run_script(sample, argv, capsys)
    assert_user_error(code, err, "--out", "already holds files")
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "grid.png", "notes.txt", "report.json"]
    assert all(p.read_bytes() == b"the user's own file" for p in out.iterdir())


def test_a_fifo_given_as_ckpt_is_one_line(tmp_path, capsys):
    from tests.hang_guard import fails_instead_of_hanging

    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    with fails_instead_of_hanging():
        code, _, err = run_script(sample, ["--ckpt", str(fifo), "--out", str(tmp_path / "o"), "--device", "cpu"],
                                  capsys)
    assert_user_error(code, err, "not a regular file")
    assert not (tmp_path / "o").exists()
