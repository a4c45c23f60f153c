"""Crash safety of train.py: SIGKILL at random moments, SIGINT/SIGTERM, NaN/Inf losses, a full disk, unsafe files.

The SIGKILL test really kills a subprocess (the tiny U-Net of MICRO_FLAGS on 16 px images), several times, and
checks that resuming each time ends with exactly the weights of an uninterrupted run.
"""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm import diffusion as diffusion_mod
from tinyddpm.checkpoint import FORMAT_VERSION, load_checkpoint
from tinyddpm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 24, 4
# Cadence of the killed runs: checkpoints, grids and log lines are all written often, so kills land in writes.
CADENCE = ["--save-every", str(SAVE_EVERY), "--sample-every", "6", "--log-every", "4", "--grid-size", "2"]
# Kill a run between fsync and os.replace of its n-th checkpoint: the worst moment for a non-atomic writer.
KILL_IN_WRITE = """
import os, signal, sys
sys.path.insert(0, {root!r})
n = [0]
def hook(event, args):
    if event == "os.rename" and str(args[1]).endswith("ckpt.pt"):
        n[0] += 1
        if n[0] == {nth}:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
import train
from tinyddpm.errors import run_cli
sys.exit(run_cli(train.main, sys.argv[1:]))
"""


def flags(tmp_path, out, steps=STEPS, extra=()):
    data = make_image_folder(str(tmp_path / "imgs"))
    return ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out", str(out),
            "--steps", str(steps), *MICRO_FLAGS, *CADENCE, *extra]


def child_env():
    # The same thread count as this process: CPU kernels then reduce in the same order, so weights match exactly.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": ROOT}


def start(argv, code=None):
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, os.path.join(ROOT, "train.py"), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, prefix):
    """Read the child's stderr until a line starts with `prefix`; the lines read. (Child flushes each line.)"""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    return lines


def assert_run_intact(out):
    """Whatever moment a run was killed at, every file in its folder is complete."""
    if (out / "ckpt.pt").exists():
        ck = load_checkpoint(out / "ckpt.pt")
        for v in ck["models"]["model"].values():
            assert torch.isfinite(v).all()
    for png in (out / "samples").glob("*.png") if (out / "samples").exists() else ():
        with Image.open(png) as im:
            im.load()  # a half-written PNG fails here
    if (out / "config.json").exists():
        json.loads((out / "config.json").read_text())


def assert_same_weights(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema"):
        for k, v in a["models"][part].items():
            assert torch.equal(v, b["models"][part][k]), (part, k)


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert run_script(train, flags(tmp_path, ref), capsys)[0] == 0
    rng = random.Random(0)
    # 1) stopped by SIGTERM after the first progress line: a checkpoint at that step, exit code 128 + 15.
    proc = start(flags(tmp_path, out))
    wait_for_line(proc, "step ")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped by SIGTERM at step" in err, err
    stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 4 <= stopped_at < STEPS and load_checkpoint(out / "ckpt.pt")["step"] == stopped_at
    assert_run_intact(out)
    # 2) killed inside its next checkpoint write: the SIGTERM checkpoint survives, the temp file is litter.
    proc = start(flags(tmp_path, out), KILL_IN_WRITE.format(root=ROOT, nth=1))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "ckpt.pt")["step"] == stopped_at
    assert any(p.name.startswith(".ckpt.pt.") for p in out.iterdir())  # the unfinished write
    assert_run_intact(out)
    # 3) killed at random moments (seeded delays after the run announces itself; a late one may find it done).
    steps_seen = [stopped_at]
    for _ in range(2):
        proc = start(flags(tmp_path, out))
        wait_for_line(proc, "training ")
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate(timeout=60)
        assert_run_intact(out)
        steps_seen.append(load_checkpoint(out / "ckpt.pt")["step"])
    assert steps_seen == sorted(steps_seen), steps_seen  # never went back
    # 4) the same command once more finishes the run: the weights are those of the uninterrupted run.
    code, _, err = run_script(train, flags(tmp_path, out), capsys)
    assert code == 0, err
    assert_same_weights(ref / "ckpt.pt", out / "ckpt.pt")
    assert_run_intact(out)
    assert not [p.name for p in out.rglob(".*.tmp")]  # the killed runs' temp files were cleaned up
    logged = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert logged == list(range(4, STEPS + 1, 4))  # no duplicate or half line from the killed runs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, capsys, monkeypatch, sig):
    """In-process: the signal arrives during step 5 (a forward pass); the run stops after it with a checkpoint."""
    out = tmp_path / "run"
    real, calls = diffusion_mod.GaussianDiffusion.training_losses, [0]

    def training_losses(*args):
        calls[0] += 1
        if calls[0] == 5:
            os.kill(os.getpid(), sig)
        return real(*args)

    monkeypatch.setattr(diffusion_mod.GaussianDiffusion, "training_losses", training_losses)
    code, _, err = run_script(train, flags(tmp_path, out, steps=100), capsys)
    assert code == 128 + sig and f"stopped by {sig.name} at step 5;" in err, err
    assert load_checkpoint(out / "ckpt.pt")["step"] == 5
    assert signal.getsignal(sig) is not None and "StopSignals" not in repr(signal.getsignal(sig))  # restored


# --- NaN / Inf ---------------------------------------------------------------------------------------------
def poison_step(monkeypatch, bad_steps, where):
    """Make the loss (where='loss') or only its gradient (where='grad') NaN at the given 1-based steps."""
    real, calls = diffusion_mod.GaussianDiffusion.training_losses, [0]

    def training_losses(self, model_fn, x0, t, noise):
        terms = real(self, model_fn, x0, t, noise)
        calls[0] += 1
        if calls[0] in bad_steps:
            zero = terms["loss"] - terms["loss"].detach()  # 0, with a gradient path to the weights
            if where == "loss":
                terms["loss"] = terms["loss"] * float("nan")
            else:  # the loss stays finite, but d/dx √x at 0 is inf, and 0·inf = NaN in every gradient
                terms["loss"] = terms["loss"] + 0.0 * torch.sqrt(zero.abs())
        return terms

    monkeypatch.setattr(diffusion_mod.GaussianDiffusion, "training_losses", training_losses)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_stops_naming_it_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "run"
    poison_step(monkeypatch, {6}, where)
    code, _, err = run_script(train, flags(tmp_path, out, steps=12), capsys)
    assert_user_error(code, err, "NaN/Inf at step 6", "step 4", "--skip-nonfinite")
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["models"]["model"].values())
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in logged] == [4]  # nothing was logged after the bad step


def test_skip_nonfinite_skips_and_counts(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    poison_step(monkeypatch, {3, 7}, "loss")
    code, _, err = run_script(train, flags(tmp_path, out, steps=8, extra=["--skip-nonfinite"]), capsys)
    assert code == 0, err
    assert "2 NaN/Inf steps skipped" in err
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 8 and ck["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ck["models"]["model"].values())
    assert json.loads(open(out / "log.jsonl").readlines()[-1])["skipped_steps"] == 2


# --- full disk, unwritable folders ----------------------------------------------------------------------------
def test_full_disk_keeps_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_script(train, flags(tmp_path, out, steps=4), capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up exactly when the next checkpoint is written
        if ".ckpt.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = run_script(train, flags(tmp_path, out, steps=8), capsys)
    assert_user_error(code, err, "No space left on device", "ckpt.pt")
    assert (out / "ckpt.pt").read_bytes() == before
    assert not [p.name for p in out.rglob(".*.tmp")]
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the same command carries on
    code, _, err = run_script(train, flags(tmp_path, out, steps=8), capsys)
    assert code == 0 and "at step 4" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, _, err = run_script(train, flags(tmp_path, out / "run", steps=2), capsys)
    finally:
        out.chmod(0o700)
    assert_user_error(code, err, "permission denied", "--out")


# --- untrusted checkpoints --------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this calls os.system: what a malicious 'checkpoint' does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_runs_code_is_refused(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format": "tinyddpm", "version": 1, "kind": "ddpm", "payload": RunsCode(marker)}, evil)
    torch.load(evil, weights_only=False)  # the file really runs code when fully unpickled …
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match="refused to load"):  # … and tinyddpm refuses it, running nothing
        load_checkpoint(evil)
    code, _, err = run_script(sample, ["--ckpt", str(evil), "--out", str(tmp_path / "s"), "--device", "cpu"], capsys)
    assert_user_error(code, err, "refused to load")
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(evil.read_bytes())
    code, _, err = run_script(train, flags(tmp_path, run, steps=2), capsys)
    assert_user_error(code, err, "refused to load")
    assert not marker.exists()


@pytest.mark.parametrize("header, words", [
    (dict(version=FORMAT_VERSION + 1), ["version", str(FORMAT_VERSION + 1), "upgrade"]),
    (dict(kind="vae"), ["kind 'vae'"]),
    (dict(kind="dcgan"), ["dcgan checkpoint", "ddpm run"]),
])
def test_newer_or_foreign_checkpoint_says_so(tmp_path, capsys, header, words):
    out = tmp_path / "run"
    assert run_script(train, flags(tmp_path, out, steps=1, extra=["--save-every", "1"]), capsys)[0] == 0
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**ck, **header}, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    code, _, err = run_script(train, flags(tmp_path, out, steps=2), capsys)
    assert_user_error(code, err, *words)
    assert (out / "ckpt.pt").read_bytes() == before
