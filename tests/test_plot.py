"""Training curves from log.jsonl (tinyddpm/plot.py): the running mean, where the line is drawn, the CLI's errors."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_user_error, run_script
from tinyddpm import plot


def test_running_mean_closed_form():
    assert plot.running_mean(np.array([1.0, 2.0, 3.0, 4.0]), window=2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert plot.running_mean(np.array([5.0]), window=10).tolist() == [5.0]


def _log(path, steps, **series):
    with open(path, "w") as f:
        for i, s in enumerate(steps):
            f.write(json.dumps({"step": int(s), **{k: float(v[i]) for k, v in series.items()}}) + "\n")
    return str(path)


def _rows_of(img, colour, column):
    """Rows of `column` where the pixel is exactly `colour` (the smoothed line's own colour)."""
    a = np.asarray(img)[:, column]
    return np.nonzero((a == colour).all(axis=1))[0]


@pytest.mark.parametrize("log_y", [False, True])
def test_a_falling_loss_is_drawn_from_top_left_to_bottom_right(log_y):
    steps = np.arange(1, 201)
    img = plot.draw_curves({"loss": (steps, 1.0 / steps)}, log_y=log_y)
    assert img.size == (plot.WIDTH, plot.HEIGHT)
    blue = plot.COLOURS[0]
    left = _rows_of(img, blue, plot.MARGIN_LEFT + 3)
    right = _rows_of(img, blue, plot.WIDTH - plot.MARGIN_RIGHT - 3)
    assert len(left) and len(right) and left.min() < right.min()  # image rows grow downwards


def test_cli_writes_a_png_for_each_key(tmp_path, capsys):
    steps = np.arange(0, 100, 10)
    log = _log(tmp_path / "log.jsonl", steps, d_loss=np.linspace(1, 0.5, 10), g_loss=np.linspace(3, 2, 10))
    code, out, err = run_script(plot, [log, "--keys", "d_loss", "g_loss"], capsys)
    assert code == 0, err
    img = Image.open(tmp_path / "curve.png")
    assert img.size == (plot.WIDTH, plot.HEIGHT)
    for colour in plot.COLOURS[:2]:  # both lines are there
        assert (np.asarray(img.convert("RGB")) == colour).all(axis=2).sum() > 50
    assert "d_loss: 10 points" in out


@pytest.mark.parametrize("content, extra, says", [
    ("not json\n", [], "jsonl"),
    ('{"step": 1, "loss": 0.5}\n', ["--keys", "d_loss"], "no d_loss"),
    ('{"step": 1, "loss": 0.5}\n', ["--out", "curve.jpg"], ".png"),
])
def test_cli_errors(content, extra, says, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(content)
    code, out, err = run_script(plot, [str(log), *extra], capsys)
    assert_user_error(code, err, says)
    assert not (tmp_path / "curve.png").exists()
