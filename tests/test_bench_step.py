"""Smoke test of benchmarks/bench_step.py: two shapes configurations timed in-process, every field reported (no
timing assertions); user mistakes are one-line errors with exit code 2."""
import importlib.util
import json
import os
import shlex

import pytest

from tests.helpers import MICRO_FLAGS, assert_user_error
from tinyddpm.errors import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_step", os.path.join(ROOT, "benchmarks", "bench_step.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SHAPES = "--dataset shapes --conditional --shapes-count 16 --image-size 16 --cross-attention " + shlex.join(MICRO_FLAGS)
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_two_configurations_are_timed_side_by_side(tmp_path, capsys):
    out = tmp_path / "step.json"
    configs = [SHAPES, SHAPES + " --cross-attn-resolutions 16 8"]
    assert bench.main([*configs, "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("repeat ") == 2 and "1.000× the first" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["flags"] for r in rows] == configs and rows[0]["ratio"] == 1.0
    assert rows[1]["parameters"] > rows[0]["parameters"]  # the added cross-attention layers
    for r in rows:
        assert len(r["all"]) == 2 and r["seconds_per_step"] > 0 and r["batch"] == 4
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["seconds_per_step"])
    a, b = rows[1]["all"], rows[0]["all"]
    assert rows[1]["ratio"] == pytest.approx((a[0] / b[0] + a[1] / b[1]) / 2)  # the median of the paired ratios


@pytest.mark.parametrize("argv,words", [
    ([SHAPES, "--repeats", "0"], ["--repeats"]),
    ([SHAPES + " --model dcgan"], ["only diffusion runs"]),
    ([SHAPES + " --cross-attn-resolutions 5"], ["--cross-attn-resolutions", "feature-map sizes"]),
])
def test_mistakes_are_one_line(argv, words, tmp_path, capsys):
    code = run_cli(bench.main, argv)
    assert_user_error(code, capsys.readouterr().err, *words)
