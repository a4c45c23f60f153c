"""train.py --minutes: the time budget fixes the step count once, stores it in the run, and a resume (even after
SIGKILL) finishes exactly that count, bit-identical to an uninterrupted `--steps <count>` run. Also what a resume
may change once a run has fixed its count or kept its autoguidance snapshot."""
import signal

import pytest
import torch

import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tests.test_reliability import start, wait_for_line
from tinyddpm import budget
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.config import build_config

CADENCE = ["--save-every", "4", "--sample-every", "1000", "--log-every", "4"]


def flags(tmp_path, out, *extra):
    data = make_image_folder(str(tmp_path / "imgs"))
    return ["--dataset", "folder", "--data-dir", data, "--image-size", "16", "--out", str(out), *MICRO_FLAGS,
            *CADENCE, *extra]


@pytest.fixture
def fixed_timing(monkeypatch):
    """A machine where every step takes 0.1 s and nothing has taken time before the first step."""
    timed = []

    def seconds(fn, calls=budget.PROBE_STEPS, skip=budget.PROBE_SKIP, sync=None):
        timed.append(1)
        return 0.1

    monkeypatch.setattr(budget, "seconds_per_call", seconds)
    monkeypatch.setattr(budget.Clock, "elapsed", lambda self: 0.0)
    return timed


def test_steps_for_fills_what_is_left():
    # 60 s, 10 s gone; a step 0.5 s plus a 2-s grid every 10 steps: 0.7 s a step → 71 steps
    assert budget.steps_for(1.0, 10.0, 0.5, 2.0, 10) == 71
    assert budget.steps_for(1.0, 100.0, 0.5) == 1  # nothing left: still one step


def test_the_budget_fixes_the_count_stores_it_and_a_resume_keeps_it(tmp_path, capsys, fixed_timing, one_thread):
    out = tmp_path / "run"
    # 0.01 min = 0.6 s at 0.1 s a step (and a grid every 1000 steps of 0.1 s): 5 steps
    code, _, err = run_script(train, flags(tmp_path, out, "--minutes", "0.01"), capsys)
    assert code == 0, err
    assert "time budget: 0.01 min → 5 steps" in err and fixed_timing == [1, 1]  # steps, then one grid
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 5 and ck["run_config"].train.steps == 5 and ck["run_config"].train.minutes == 0.01
    assert '"steps": 5' in (out / "config.json").read_text()
    # The same command again: the stored count, not timed again (the machine "got faster": it would say 10).
    fixed_timing.clear()
    code, _, err = run_script(train, flags(tmp_path, out, "--minutes", "0.01"), capsys)
    assert code == 0 and "time budget" not in err and not fixed_timing, err
    # Another budget is refused, and changes nothing.
    before = (out / "ckpt.pt").read_bytes()
    code, _, err = run_script(train, flags(tmp_path, out, "--minutes", "0.02"), capsys)
    assert_user_error(code, err, "--minutes 0.01", "--steps N")
    assert (out / "ckpt.pt").read_bytes() == before and '"steps": 5' in (out / "config.json").read_text()
    # --steps trains on to another count.
    code, _, err = run_script(train, flags(tmp_path, out, "--steps", "8"), capsys)
    assert code == 0 and load_checkpoint(out / "ckpt.pt")["step"] == 8, err


def test_steps_and_minutes_together_are_refused(tmp_path, capsys):
    code, _, err = run_script(train, flags(tmp_path, tmp_path / "x", "--steps", "3", "--minutes", "1"), capsys)
    assert_user_error(code, err, "--steps", "--minutes", "not both")
    assert not (tmp_path / "x").exists()


def test_the_tiny_preset_trains_for_30_minutes_unless_steps_are_given():
    assert build_config("tiny", {}).train.minutes == 30.0
    assert build_config("tiny", {}, model="dcgan").train.minutes == 30.0
    assert build_config("tiny", {"train": {"steps": 100}}).train.minutes == 0.0
    assert build_config("small", {}).train.minutes == 0.0


# train.py in a child whose clock says 0.1 s a step (after really running each probe once), so the budget's count
# is known: 0.02 min = 1.2 s → 11 steps.
FIXED_CHILD = """
import sys
sys.path.insert(0, {root!r})
from tinyddpm import budget
def seconds(fn, calls=budget.PROBE_STEPS, skip=budget.PROBE_SKIP, sync=None):
    fn()
    return 0.1
budget.seconds_per_call = seconds
budget.Clock.elapsed = lambda self: 0.0
import train
from tinyddpm.errors import run_cli
sys.exit(run_cli(train.main, sys.argv[1:]))
"""


def test_sigkill_during_a_budgeted_run_resumes_bit_identically(tmp_path, capsys, fixed_timing):
    """A budgeted run killed by SIGKILL after its first checkpoints, then resumed with the same command: the final
    weights are those of an uninterrupted run of the count the budget fixed."""
    from tests.test_reliability import ROOT

    out = tmp_path / "budgeted"
    argv = flags(tmp_path, out, "--minutes", "0.02")
    proc = start(argv, FIXED_CHILD.format(root=ROOT))
    lines = wait_for_line(proc, "step 8/")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert any(ln.startswith("time budget: 0.02 min → 11 steps") for ln in lines), lines
    assert load_checkpoint(out / "ckpt.pt")["step"] in (4, 8)
    code, _, err = run_script(train, argv, capsys)  # resumes: finishes the stored count, no new timing
    assert code == 0 and "resuming" in err and not fixed_timing, err
    steps = 11
    ref = tmp_path / "ref"
    assert run_script(train, flags(tmp_path, ref, "--steps", str(steps)), capsys)[0] == 0
    a, b = load_checkpoint(out / "ckpt.pt"), load_checkpoint(ref / "ckpt.pt")
    assert a["step"] == b["step"] == steps
    for part in ("model", "ema"):
        for k, v in a["models"][part].items():
            assert torch.equal(v, b["models"][part][k]), (part, k)


def test_a_snapshot_once_taken_keeps_its_guide_at(tmp_path, capsys, one_thread):
    out = tmp_path / "g"
    assert run_script(train, flags(tmp_path, out, "--steps", "8", "--guide-at", "0.5"), capsys)[0] == 0
    before = (out / "config.json").read_text()
    code, _, err = run_script(train, flags(tmp_path, out, "--steps", "8", "--guide-at", "0.25"), capsys)
    assert_user_error(code, err, "snapshot at step 4", "--guide-at 0.5")
    assert (out / "config.json").read_text() == before
    # Training on to another count keeps the snapshot and says how old it now is.
    code, _, err = run_script(train, flags(tmp_path, out, "--steps", "16", "--guide-at", "0.5"), capsys)
    assert code == 0 and "snapshot is the EMA of step 4" in err and "step 8" in err, err
    assert load_checkpoint(out / "ckpt.pt")["models"]["guide"]["step"] == 4


def test_guide_at_1_is_refused(tmp_path, capsys):
    code, _, err = run_script(train, flags(tmp_path, tmp_path / "x", "--steps", "2", "--guide-at", "1"), capsys)
    assert_user_error(code, err, "--guide-at", "less than 1")


def test_a_dcgan_run_keeps_a_budget_too(tmp_path, capsys, fixed_timing, one_thread):
    out = tmp_path / "gan"
    data = make_image_folder(str(tmp_path / "imgs"))
    code, _, err = run_script(train, ["--model", "dcgan", "--dataset", "folder", "--data-dir", data, "--image-size",
                                      "16", "--out", str(out), "--preset", "tiny", "--g-channels", "8",
                                      "--d-channels", "8", "--batch-size", "4", "--minutes", "0.01", "--device",
                                      "cpu", *CADENCE], capsys)
    assert code == 0 and "time budget: 0.01 min → 5 steps" in err, err
    assert load_checkpoint(out / "ckpt.pt")["run_config"].train.steps == 5
