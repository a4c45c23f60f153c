"""benchmarks/gpu_evidence.py: the --smoke run does every step (bench_unet.py, train.py,
sample.py, bench_fid.py against a stand-in pytorch-fid, the quality run and its report) and writes the page; the
bundle round-trips the cats exactly; the time limits work; user mistakes are one line. No timing assertions: the
figures of a smoke run mean nothing."""
import importlib.util
import json
import os
import signal
import sys
import time
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinyddpm.data import load_cifar10
from tinyddpm.errors import EXIT_USAGE, UserError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_evidence", os.path.join(ROOT, "benchmarks", "gpu_evidence.py"))
ev_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ev_mod)
STEPS = ("unet", "loop", "sampler", "fid", "quality")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

# pytorch-fid needs torchvision, which is not installed here: this stand-in loads the checkpoint bench_fid writes,
# from where pytorch-fid's load_state_dict_from_url looks, into tinyddpm's network, in bench_fid's subprocess.
STAND_IN_INCEPTION = '''
import os, torch
from tinyddpm.inception import FID_WEIGHTS_NAME, FIDInceptionV3

class InceptionV3(torch.nn.Module):
    BLOCK_INDEX_BY_DIM = {2048: 3}

    def __init__(self, blocks):
        super().__init__()
        state = torch.load(os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME), weights_only=True)
        assert state["fc.weight"].shape == (1008, 2048)  # the TF graph's classifier, as pytorch-fid's file has it
        self.net = FIDInceptionV3().eval()
        self.net.load_state_dict({k: v for k, v in state.items() if k in self.net.state_dict()}, strict=False)

    def forward(self, x):  # [B, 3, H, W] in [0, 1] → [[B, 2048, 1, 1]], as pytorch-fid's pool3 block
        return [self.net(x)[:, :, None, None]]
'''


@pytest.fixture
def stand_in_pytorch_fid(tmp_path, monkeypatch):
    package = tmp_path / "site" / "pytorch_fid"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inception.py").write_text(STAND_IN_INCEPTION)
    (package / "fid_score.py").write_text("from tinyddpm.distance import frechet_distance as "
                                          "calculate_frechet_distance\n")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(package.parent), ROOT]))


@pytest.mark.filterwarnings("ignore:a covariance is singular")  # the report's 4 images: expected
def test_smoke_run_does_every_step(tmp_path, stand_in_pytorch_fid):
    out = tmp_path / "evidence"
    assert ev_mod.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads((out / "gpu_evidence.json").read_text())
    md = (out / "gpu_evidence.md").read_text()
    steps = result["steps"]
    assert result["smoke"] and list(steps) == list(STEPS)
    for name, step in steps.items():
        assert step["status"] == "ok" and step.get("exit_code", 0) == 0, (name, step.get("error"))
        assert step["seconds"] <= step["cap_s"] + 1
    assert result["bundle"]["cats_pixels_verified"] == dict(train=True, test=True)  # JPEG files gave the pixels

    (row,) = steps["unet"]["figures"]["results"]  # a CPU's one mode, tinyddpm only (diffusers is not installed)
    assert (row["system"], row["mode"]) == ("tinyddpm", "fp32") and "error" not in row
    assert row["train_img_s"] > 0 and row["sample_img_steps_s"] > 0 and "sample_graph_img_steps_s" not in row
    assert "| tinyddpm | fp32 |" in steps["unet"]["output"] and "| tinyddpm | fp32 |" in md  # bench_unet's table

    assert steps["loop"]["steps"] == 4 and steps["loop"]["img_s"] > 0  # SMOKE's --steps
    assert steps["sampler"]["images"] == 4 and steps["sampler"]["wall_s"] > 0  # SMOKE's --n

    fid = steps["fid"]["figures"]["extractor"]
    assert set(fid["img_per_s"]) == {"ours", "pytorch-fid"} and min(fid["img_per_s"].values()) > 0
    # the same float16 weights on both sides: features equal to float tolerance, a wrong layout or input is far off
    assert fid["max_feature_diff"]["pytorch-fid"] <= 1e-3 * fid["max_feature"]

    quality = steps["quality"]
    assert quality["steps"] == 6 and quality["report"]["step"] == quality["steps"]  # SMOKE's --steps
    assert quality["report"]["results"][0]["fid"] > 0
    for heading in ["## Goals", "Smoke run"] + [f"## {name}: `" for name in STEPS]:
        assert heading in md
    assert quality["report_md"] in md
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert sorted(os.listdir(out)) == sorted(list(ev_mod.OUT_FILES) + pngs) and 1 <= len(pngs) <= ev_mod.REPORT_PNGS


def test_a_failing_or_slow_step_is_recorded_and_the_run_goes_on(tmp_path):
    sizes = dict(ev_mod.SMOKE, caps=dict(slow=0.3, broken=5, fine=5))
    ev = ev_mod.Evidence(SimpleNamespace(out=str(tmp_path), smoke=True, budget_s=30), sizes, str(tmp_path))

    def slow(ev, res):
        res["before"] = 1
        time.sleep(5)  # interrupted by the step's alarm

    def broken(ev, res):
        print("printed before")
        raise RuntimeError("boom\nsecond line")

    t, alarm = time.perf_counter(), signal.getsignal(signal.SIGALRM)
    for name, fn in (("slow", slow), ("broken", broken), ("fine", lambda ev, res: res.update(value=2))):
        ev_mod.run_step(ev, name, fn)
    assert time.perf_counter() - t < 4
    saved = json.loads((tmp_path / "gpu_evidence.json").read_text())["steps"]
    assert saved["slow"]["status"] == "timeout" and saved["slow"]["before"] == 1
    assert saved["broken"]["status"] == "failed" and saved["broken"]["error"] == "RuntimeError: boom"
    assert saved["broken"]["output"] == "printed before\n"  # kept for the page
    assert saved["fine"]["status"] == "ok" and saved["fine"]["value"] == 2
    assert signal.getsignal(signal.SIGALRM) == alarm and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert "| broken | failed: RuntimeError: boom |" in (tmp_path / "gpu_evidence.md").read_text()


def test_sigterm_after_stops_train_py_with_a_checkpoint(tmp_path):
    """The quality run's clock: SIGTERM makes train.py save a checkpoint and return 128 + 15, also when the time is
    up before train.py has installed its handler (here at once: the clock waits for the handler)."""
    import train
    from tinyddpm.checkpoint import load_checkpoint

    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    data = ev_mod.write_cifar_layout(str(tmp_path / "data"), images, images[:2])
    run = tmp_path / "run"
    argv = ["--dataset", "cifar", "--class", "cat", "--data-dir", data, "--preset", "tiny", "--device", "cpu",
            "--out", str(run), "--steps", "400", "--batch-size", "2", "--log-every", "1", "--save-every", "400",
            "--sample-every", "400"]
    before = signal.getsignal(signal.SIGTERM)
    with ev_mod.sigterm_after(0):
        code = train.main(argv)
    assert code == 128 + signal.SIGTERM
    assert 0 < load_checkpoint(str(run / "ckpt.pt"))["step"] < 400
    assert signal.getsignal(signal.SIGTERM) == before  # restored afterwards


def toy_cats(n, seed):
    """n smooth random images and their JPEG files (which decode to them exactly)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, 4, 4, 3), np.uint8).repeat(8, 1).repeat(8, 2)
    files = [ev_mod.encode(img, "JPEG") for img in blocks]
    return np.stack([ev_mod.decode(f) for f in files]), files


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the checksum file rewritten at the end
def test_cats_round_trip_exactly(tmp_path):
    (train, train_jpegs), (test, _) = toy_cats(6, 1), toy_cats(3, 2)
    path = str(tmp_path / ev_mod.CATS)
    test[0, 0, 0] ^= 1  # no longer what any JPEG file decodes to: travels as a PNG
    counts = ev_mod.pack_cats(path, dict(train=train, test=test), dict(train=train_jpegs[::-1]))  # any order
    assert counts == dict(jpeg=6, png=3)
    splits, verified = ev_mod.unpack_cats(path)
    assert verified == dict(train=True, test=True)
    assert np.array_equal(splits["train"], train) and np.array_equal(splits["test"], test)
    root = ev_mod.write_cifar_layout(str(tmp_path / "data"), train, test)
    assert np.array_equal(load_cifar10(root, "train", ["cat"], download=False)[0], train)  # same order
    assert np.array_equal(load_cifar10(root, "test", ["cat"], download=False)[0], test)
    assert len(load_cifar10(root, "train", ["dog"], download=False)[0]) == 0

    with zipfile.ZipFile(path, "a") as z:  # a wrong checksum is reported, not hidden
        z.writestr(ev_mod.CHECKSUMS, json.dumps(dict(train=ev_mod.pixels_sha256(train), test="0" * 64)))
    assert ev_mod.unpack_cats(path)[1] == dict(train=True, test=False)


def test_make_cats_takes_the_export_files_that_decode_exactly(tmp_path, monkeypatch):
    (train, train_jpegs), (test, test_jpegs) = toy_cats(5, 3), toy_cats(2, 4)
    data = ev_mod.write_cifar_layout(str(tmp_path / "data"), train, test)
    monkeypatch.setattr(ev_mod, "TRAIN_CATS", 5)
    monkeypatch.setattr(ev_mod, "TEST_CATS", 2)
    export = tmp_path / "export.zip"
    with zipfile.ZipFile(export, "w") as z:
        for i, f in enumerate(train_jpegs):
            z.writestr(f"train/cat/{i:04d}.jpg", f)
        z.writestr("train/dog/0000.jpg", test_jpegs[0])  # another class: not a candidate
        z.writestr("test/cat/0000.jpg", test_jpegs[1])
    assert ev_mod.make_cats(str(tmp_path), data, str(export)) == dict(jpeg=6, png=1)
    assert ev_mod.make_cats(str(tmp_path), data, "no-such.zip") == dict(jpeg=0, png=7)
    assert np.array_equal(ev_mod.unpack_cats(str(tmp_path / ev_mod.CATS))[0]["test"], test)
    monkeypatch.setattr(ev_mod, "TEST_CATS", 3)
    with pytest.raises(UserError, match="expected 3"):
        ev_mod.make_cats(str(tmp_path), data, "no-such.zip")


def test_size_check(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.bin").write_bytes(b"0" * 1000)
    repo, size = ev_mod.check_size(str(tmp_path / "b"), ROOT)
    assert size == 1000 and repo > 0 and "travels:" in capsys.readouterr().out
    with pytest.raises(UserError, match="MB, over the"):
        ev_mod.check_size(str(tmp_path / "b"), ROOT, limit=repo + 999)


def test_goals_are_read_off_the_result():
    rows = [dict(system="tinyddpm", mode="bf16", train_img_s=300.0, sample_img_steps_s=10.0),
            dict(system="tinyddpm", mode="bf16-compile", train_img_s=450.0, sample_img_steps_s=8.0,
                 sample_graph_img_steps_s=12.0),
            dict(system="diffusers", mode="bf16-compile", train_img_s=200.0, sample_img_steps_s=7.0),
            dict(system="diffusers-cl", mode="bf16-compile", train_img_s=250.0, sample_img_steps_s=9.0),
            dict(system="diffusers", mode="fp32", train_img_s=900.0, sample_img_steps_s=1.0),  # not the goal's mode
            dict(system="diffusers-cl", mode="bf16", error="x")]
    memo = dict(train_images=5000, inception=dict(fraction=0.04), pixels=dict(fraction=0.12))
    result = dict(steps=dict(unet=dict(status="ok", figures=dict(results=rows)),
                             quality=dict(status="ok", report=dict(results=[dict(ratio=1.1, memorisation=memo)]))))
    assert ev_mod.goals(result) == [pytest.approx(1.8), pytest.approx(12 / 9), 1.1, 0.12]
    md = ev_mod.markdown(result)
    assert "| 1.80× | yes |" in md and "| 1.33× | no |" in md and "| 1.10× | yes |" in md and "| 12.0% | no |" in md
    assert ev_mod.goals(dict(steps={})) == [None] * 4  # nothing measured: nothing claimed
    assert ev_mod.markdown(dict(steps={})).count("| — | — |") == len(ev_mod.GOALS)


@pytest.mark.parametrize("argv,match", [
    ([], "pass --out FOLDER"),
    (["--out", "FILE"], "is a file"),
    (["--make-bundle", "--bundle", "FILE"], "is a file"),
    (["--out", "DIR", "--bundle", "nowhere"], "no bundle in nowhere"),
    (["--out", "DIR", "--bundle", "BUNDLE"], "no CUDA GPU"),
])
def test_user_mistakes_are_one_line_errors(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "FILE").write_text("mine")
    (tmp_path / "BUNDLE").mkdir()
    (tmp_path / "BUNDLE" / ev_mod.CATS).write_bytes(b"")
    argv = [str(tmp_path / a) if a in ("FILE", "DIR", "BUNDLE") else a for a in argv]
    assert run_cli(ev_mod.main, argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "FILE").read_text() == "mine" and not (tmp_path / "DIR").exists()


def test_bundle_maker_one_line_error(tmp_path, capsys):
    argv = ["--make-bundle", "--bundle", str(tmp_path / "b"), "--data-dir", str(tmp_path / "none"), "--no-wheels"]
    assert run_cli(ev_mod.main, argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10 not found") and err.count("\n") == 1
