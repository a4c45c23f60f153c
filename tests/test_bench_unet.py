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

TINY_CPU = ["--config", "tiny", "--device", "cpu", "--iters", "2", "--warmup", "1", "--repeats", "1",
            "--sample-batch", "4", "--batch-size", "4"]
FIELDS = ("train_img_s", "train_tflops", "sample_img_steps_s", "first_calls_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def test_tiny_cpu_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(TINY_CPU + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| system | mode | train img/s | peak mem (GiB) | TFLOP/s | MFU | train vs diffusers" in printed
    assert "| tinyddpm | fp32 |" in printed and "no MFU" in printed

    result = json.loads(out.read_text())
    systems = ["tinyddpm"] + (["diffusers", "diffusers-cl"] if result["diffusers"] else [])
    assert [(r["system"], r["mode"]) for r in result["results"]] == [(s, "fp32") for s in systems]  # CPU: fp32
    for r in result["results"]:
        assert all(r[k] > 0 for k in FIELDS), r
        # CPU: no CUDA memory statistics, no CUDA graph, no known peak
        assert r["peak_mem_gib"] is None and "sample_graph_img_steps_s" not in r and r["mfu"] is None
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
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--json", "."], "is a folder"),
])
def test_user_mistakes_are_one_line_errors(argv, match, capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert run_cli(bench.main, TINY_CPU + argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------ benchmarks/bench_sharing.py

sharing_spec = importlib.util.spec_from_file_location("bench_sharing",
                                                      os.path.join(ROOT, "benchmarks", "bench_sharing.py"))
sharing = importlib.util.module_from_spec(sharing_spec)
sharing_spec.loader.exec_module(sharing)

TINY_SHARING = ["--window", "0.3", "--settle", "0.3", "--warmup", "0", "--batch-size", "1"]


def test_sharing_benchmark_runs_a_worker_beside_its_own_neighbour(tmp_path, capsys):
    """One policy at toy sizes: the worker trains, the neighbour starts and is stopped, every figure is reported."""
    out = tmp_path / "sharing.json"
    assert sharing.main(TINY_SHARING + ["--policies", "new", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| policy | idle img/s | threads | shared img/s |" in printed and "new: shared / idle = " in printed
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["policy"] == "new" and row["idle_img_s"] > 0 and row["shared_img_s"] > 0 and row["shared_vs_idle"] > 0
    assert row["neighbour_iter_s"] > 0 and row["threads_idle"] >= 1 and row["threads_shared"] >= 1
    assert set(result["summary"]) == {"new"}  # one policy: no new / old comparison


def test_sharing_ratios_of_fixed_rows():
    rows = [dict(policy="old", idle_img_s=150.0, shared_img_s=15.0), dict(policy="new", idle_img_s=200.0,
                                                                        shared_img_s=110.0),
            dict(policy="new", idle_img_s=200.0, shared_img_s=90.0)]
    s = sharing.summary(rows)
    assert [r["shared_vs_idle"] for r in rows] == pytest.approx([0.1, 0.55, 0.45])
    assert s["old"]["shared_vs_idle"] == pytest.approx(0.1) and s["new"]["shared_vs_idle"] == pytest.approx(0.5)
    assert s["new_idle_vs_old_idle"] == pytest.approx(4 / 3)


@pytest.mark.parametrize("argv,match", [
    (["--window", "0"], "--window must be > 0"),
    (["--repeats", "0"], "must be at least 1"),
    (["--json", "."], "is a folder"),
])
def test_sharing_benchmark_user_mistakes_are_one_line_errors(argv, match, capsys):
    assert run_cli(sharing.main, TINY_SHARING + argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_ratios_are_medians_against_the_faster_diffusers_layout():
    runs = [dict(system=s, mode="fp32", train_img_s=tr, sample_img_steps_s=sa, peak_mem_gib=None)
            for s, tr, sa in [("tinyddpm", 30.0, 300.0), ("diffusers", 10.0, 200.0), ("diffusers-cl", 20.0, 100.0),
                              ("tinyddpm", 40.0, 500.0), ("diffusers", 10.0, 200.0), ("diffusers-cl", 20.0, 100.0),
                              ("tinyddpm", 90.0, 400.0), ("diffusers", 10.0, 200.0), ("diffusers-cl", 20.0, 100.0)]]
    rows = bench.median_rows(runs)
    bench.add_ratios(rows)
    ours = rows[0]
    assert (ours["system"], ours["train_img_s"], ours["sample_img_steps_s"], ours["repeats"]) == \
        ("tinyddpm", 40.0, 400.0, 3)
    assert ours["train_vs_diffusers"] == 2.0 and ours["sample_vs_diffusers"] == 2.0  # peers: cl train, NCHW sample


def test_sampling_ratio_takes_each_row_s_faster_of_eager_and_cuda_graph():
    rows = [dict(system="tinyddpm", mode="bf16", train_img_s=1.0, sample_img_steps_s=300.0,
                 sample_graph_img_steps_s=600.0),
            dict(system="diffusers", mode="bf16", train_img_s=1.0, sample_img_steps_s=400.0,
                 sample_graph_img_steps_s=200.0),
            dict(system="diffusers-cl", mode="bf16", error="RuntimeError: out of memory")]
    bench.add_ratios(rows)
    assert rows[0]["sample_vs_diffusers"] == 1.5 and "sample_vs_diffusers" not in rows[2]
    assert "| diffusers-cl | bf16 | failed: RuntimeError: out of memory |" in bench.table(rows[2:])


def test_only_the_faster_diffusers_layout_is_compiled():
    runs = [dict(system="diffusers", mode="bf16", train_img_s=10.0), dict(system="diffusers-cl", mode="bf16",
                                                                          train_img_s=20.0)]
    assert bench.not_compiled(runs, "diffusers", "bf16-compile")
    assert bench.not_compiled(runs, "diffusers-cl", "bf16-compile") is None
    assert bench.not_compiled(runs, "diffusers", "bf16") is None  # not a compiled mode
    assert bench.not_compiled(runs, "tinyddpm", "bf16-compile") is None
    assert bench.not_compiled(runs[:1], "diffusers", "bf16-compile") is None  # the other was not measured
    assert bench.not_compiled(runs, "diffusers", "fp32-compile") is None  # fp32 was not measured


def test_peak_tflops_by_device_name():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0 and bench.peak_tflops("cpu") is None
