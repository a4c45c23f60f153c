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


def counts_from(monkeypatch, *counts):
    """budget.steps_for answers `counts` in turn (the probe's count, then what is left after the warm-up) and
    records the seconds a step it was given."""
    given, answers = [], iter(counts)

    def steps_for(minutes, elapsed, step_seconds, grid_seconds=0.0, sample_every=1):
        given.append(step_seconds)
        return next(answers)

    monkeypatch.setattr(budget, "steps_for", steps_for)
    return given


def test_a_budgeted_run_fits_its_count_again_after_the_warm_up_and_equals_that_steps_run(
        tmp_path, capsys, monkeypatch, fixed_timing, one_thread):
    """The probe's count (60) is fitted again from the run's own steps at the warm-up's last step (25): 25 done +
    15 left = 40. Nothing before that step depends on the count, so the weights are those of `--steps 40`, and the
    autoguidance snapshot (--guide-at 0.9) is taken at step 36 of the 40."""
    given = counts_from(monkeypatch, 60, 15)
    monkeypatch.setattr(budget, "seconds_per_call", lambda *a, **k: 10.0)  # a probe far slower than the run
    out, warm = tmp_path / "run", ["--warmup", "25", "--guide-at", "0.9"]
    code, _, err = run_script(train, flags(tmp_path, out, "--minutes", "1", *warm), capsys)
    assert code == 0, err
    assert "time budget: 1 min → 60 steps" in err and "the 20 steps to step 25 took" in err, err
    assert "(the probe: 10.000) → 40 steps" in err and "step 40/40" in err, err
    assert given[0] == 10.0 and 0 < given[1] < 10.0  # the probe's 10 s, then the run's own timing
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 40 and ck["run_config"].train.steps == 40 and ck["run_config"].train.minutes == 1
    assert ck["models"]["guide"]["step"] == 36 and '"steps": 40' in (out / "config.json").read_text()
    ref = tmp_path / "ref"
    assert run_script(train, flags(tmp_path, ref, "--steps", "40", *warm), capsys)[0] == 0
    b = load_checkpoint(ref / "ckpt.pt")
    for part in ("model", "ema"):
        for k, v in ck["models"][part].items():
            assert torch.equal(v, b["models"][part][k]), (part, k)
    for k, v in ck["models"]["guide"]["weights"].items():
        assert torch.equal(v, b["models"]["guide"]["weights"][k]), k


def test_the_refit_uses_the_run_s_own_timing_when_the_probe_was_faster(tmp_path, capsys, monkeypatch, fixed_timing,
                                                                        one_thread):
    given = counts_from(monkeypatch, 60, 15)
    monkeypatch.setattr(budget, "seconds_per_call", lambda *a, **k: 1e-6)  # no real step is this fast
    code, _, err = run_script(train, flags(tmp_path, tmp_path / "r", "--minutes", "1", "--warmup", "25",
                                           "--guide-at", "0.9"), capsys)
    assert code == 0 and "(the probe: 0.000) → 40 steps" in err, err
    assert given[0] == pytest.approx(1e-6) and given[1] > 1e-4


def test_the_refit_keeps_the_count_when_the_snapshot_would_move_before_the_warm_up_end(
        tmp_path, capsys, monkeypatch, fixed_timing, one_thread):
    # --guide-at 0.5: 60 steps keep the snapshot at 30 (after the warm-up's 25); 25 + 15 = 40 would keep it at 20.
    counts_from(monkeypatch, 60, 15)
    out = tmp_path / "run"
    code, _, err = run_script(train, flags(tmp_path, out, "--minutes", "1", "--warmup", "25", "--guide-at", "0.5"),
                              capsys)
    assert code == 0 and "40 steps would move the autoguidance snapshot before this step: keeping 60" in err, err
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 60 and ck["models"]["guide"]["step"] == 30


def test_no_refit_for_fixed_steps_short_warm_ups_or_a_narrow_guide(tmp_path, capsys, monkeypatch, fixed_timing,
                                                                    one_thread):
    assert not budget.Refit.possible(budget.Length(60), 100)  # --steps or a resume: no probe
    assert not budget.Refit.possible(budget.Length(60, 0.1), budget.RETIME_SKIP + budget.PROBE_STEPS - 1)
    assert budget.Refit.possible(budget.Length(60, 0.1), budget.RETIME_SKIP + budget.PROBE_STEPS)
    counts_from(monkeypatch, 60, 15)
    code, _, err = run_script(train, flags(tmp_path, tmp_path / "n", "--minutes", "1", "--warmup", "25",
                                           "--guide-at", "0.9", "--guide-channels", "8"), capsys)
    assert code == 0 and "1 min → 60 steps" in err and "steps to step" not in err, err
    assert load_checkpoint(tmp_path / "n" / "ckpt.pt")["step"] == 60
