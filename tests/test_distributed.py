"""torchrun: 2 gloo processes on the CPU train the same weights as one process with the same global batch.

The torchrun run resumes a single-process checkpoint (so resuming under torchrun is tested too) and an audit hook
in each process records every file it writes: only rank 0 may write anything into the run folder.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.config import build_config
from tinyddpm.models import build_unet
from tinyddpm.runs import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two processes sum their shards' gradients in another order than one process: float32 rounding. We compare what
# the networks compute on fixed inputs, not every weight: a per-channel bias just before a GroupNorm with one
# channel per group gets an exactly-zero gradient, which Adam turns into ±lr steps of pure rounding noise that
# change nothing downstream. Measured output differences are ~1e-7; a real mistake (a wrong shard, unaveraged or
# doubled gradients, per-rank noise) moves the outputs by ~1e-3.
ATOL, RTOL = 1e-5, 1e-4
RECORD_WRITES = """
import os, sys
sys.path.insert(0, {root!r})
run_dir, log = os.path.abspath({run!r}), {log!r} + os.environ["RANK"]
written = set()
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    paths = []
    if event == "open" and isinstance(args[0], str) and (
            (args[1] and any(c in args[1] for c in "wax+")) or (args[1] is None and args[2] & WRITE)):
        paths = [args[0]]
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir") and isinstance(args[0], str):
        paths = [str(a) for a in args[:2] if isinstance(a, str)]
    written.update(p for p in map(os.path.abspath, paths) if p.startswith(run_dir))

sys.addaudithook(hook)
import train
from tinyddpm.errors import run_cli
code = run_cli(train.main, sys.argv[1:])
with open(log, "w") as f:
    f.write("\\n".join(sorted(written)))
sys.exit(code)
"""


def outputs(ckpt, part):
    """The network's output on fixed inputs: x [4, 3, 16, 16], t = 0, 33, 66, 99."""
    net = build_unet(ckpt["run_config"], ckpt["labels"])
    net.load_state_dict(ckpt["models"][part])
    x = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return net.eval()(x, torch.tensor([0, 33, 66, 99]))


def test_two_gloo_processes_equal_one_process(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / "imgs"))
    base = ["--dataset", "folder", "--data-dir", data, "--image-size", "16", *MICRO_FLAGS, "--save-every", "2",
            "--log-every", "2", "--sample-every", "3", "--grid-size", "2", "--no-flip"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_script(train, [*base, "--out", str(one), "--steps", "5"], capsys)[0] == 0
    assert run_script(train, [*base, "--out", str(two), "--steps", "2"], capsys)[0] == 0  # resumed by torchrun

    runner = tmp_path / "runner.py"
    runner.write_text(RECORD_WRITES.format(root=ROOT, run=str(two), log=str(tmp_path / "writes-")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(runner), *base, "--out", str(two), "--steps", "5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("resuming") == 1 and "× 2 processes" in proc.stderr, proc.stderr  # rank 0 talks

    a, b = load_checkpoint(one / "ckpt.pt"), load_checkpoint(two / "ckpt.pt")
    assert a["step"] == b["step"] == 5 and a["sampler"] == b["sampler"]
    for part in ("model", "ema"):
        torch.testing.assert_close(outputs(b, part), outputs(a, part), atol=ATOL, rtol=RTOL, msg=part)
    assert len(b["rng"]["ranks"]) == 2
    log_a, log_b = ([json.loads(line) for line in open(run / "log.jsonl")] for run in (one, two))
    assert [r["step"] for r in log_b] == [2, 4, 5]
    for ra, rb in zip(log_a, log_b):  # the losses averaged over both processes' shards equal one process's
        assert rb["loss"] == pytest.approx(ra["loss"], rel=RTOL)

    rank0 = (tmp_path / "writes-0").read_text().split()
    rank1 = (tmp_path / "writes-1").read_text().split()
    assert rank1 == [], rank1
    assert any(p.endswith("ckpt.pt") for p in rank0) and any(p.endswith("step_0000003.png") for p in rank0)


def test_global_batch_must_split_evenly():
    cfg = build_config("tiny", {"train": {"batch_size": 6}})
    check_config(cfg, world_size=3)
    with pytest.raises(Exception, match="global batch .* 4 processes; use a multiple of 4"):
        check_config(cfg, world_size=4)


def test_torchrun_vars_without_torchrun(tmp_path, capsys, monkeypatch):
    """RANK/WORLD_SIZE left in the environment without the rest (e.g. copied from a job script) is one clear line."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_script(train, ["--dataset", "folder", "--data-dir", str(tmp_path), "--out",
                                      str(tmp_path / "run"), *MICRO_FLAGS], capsys)
    assert_user_error(code, err, "torchrun", "LOCAL_RANK")
