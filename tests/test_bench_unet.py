"""Smoke test of benchmarks/bench_unet.py: the tiny CPU configuration runs in-process and reports every field
(no timing assertions); user mistakes are one-line errors with exit code 2."""
import importlib.util
import json
import os

import pytest
import torch

from tinyddpm.errors import EXIT_USAGE, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_unet", os.path.join(ROOT, "benchmarks", "bench_unet.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY_CPU = ["--config", "tiny", "--device", "cpu", "--iters", "2", "--warmup", "1", "--modes", "fp32",
            "--sample-batch", "4", "--batch-size", "4"]
FIELDS = ("train_img_s", "train_tflops", "mfu", "sample_img_steps_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_tiny_cpu_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(TINY_CPU + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| system | mode | train img/s | peak mem (GiB) | TFLOP/s | MFU | train vs diffusers" in printed
    assert "| tinyddpm | fp32 |" in printed

    result = json.loads(out.read_text())
    systems = ["tinyddpm"] + (["diffusers"] if result["diffusers"] else [])
    assert [(r["system"], r["mode"]) for r in result["results"]] == [(s, "fp32") for s in systems]
    for r in result["results"]:
        assert all(r[k] > 0 for k in FIELDS), r
        assert r["peak_mem_gib"] is None  # CPU: no CUDA memory statistics
    from tinyddpm.config import build_config
    from tinyddpm.models import build_unet, no_labels
    from tinyddpm.unet import count_parameters

    # The benchmark must build exactly the `tiny` preset's network.
    assert result["params"]["tinyddpm"] == count_parameters(build_unet(build_config("tiny", {}), no_labels()))
    assert result["train_flops_per_step"]["tinyddpm"] > 0
    if result["diffusers"]:  # the same network: same size and FLOPs
        assert result["params"]["diffusers"] == result["params"]["tinyddpm"]
        assert result["results"][0]["train_vs_diffusers"] > 0
    else:
        assert "diffusers is not installed" in printed and result["notes"]
        assert result["results"][0]["train_vs_diffusers"] is None


@pytest.mark.parametrize("argv,match", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "tpu9"], "not a torch device"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--json", "."], "is a folder"),
])
def test_user_mistakes_are_one_line_errors(argv, match, capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert run_cli(bench.main, TINY_CPU + argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1 and "Traceback" not in err
