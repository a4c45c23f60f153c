"""benchmarks/gpu_evidence.py and make_gpu_bundle.py: the --smoke run reports every section (figures or recorded
skips, never a failure), the bundle round-trips the cats exactly, the time limits work, user mistakes are one line.
No timing assertions: the figures of a smoke run mean nothing."""
import dataclasses
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


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev_mod = load("gpu_evidence")
sections = sys.modules["gpu_sections"]  # imported by gpu_evidence (benchmarks/ is on sys.path from there)
fid_section = sys.modules["gpu_fid"]
bundle = sys.modules["make_gpu_bundle"]
SECTIONS = ("train", "sample", "fid", "quality")

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def figures_or_skip(row, key):
    """A row has its figure (> 0) or says why it was skipped; an error fails the test."""
    assert "error" not in row, row
    assert row.get(key, 0) > 0 or row.get("skipped"), row


@pytest.mark.filterwarnings("ignore:a covariance is singular")  # 4 + 4 images: expected
def test_smoke_run_reports_every_section(tmp_path):
    out = tmp_path / "evidence"
    assert ev_mod.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads((out / "gpu_evidence.json").read_text())
    md = (out / "gpu_evidence.md").read_text()
    assert result["smoke"] and list(result["sections"]) == list(SECTIONS)
    for name, sec in result["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert sec["seconds"] <= sec["cap_s"] + 1
    assert all(result["bundle"]["cats_pixels_verified"].values())  # the JPEG round trip gave the packed pixels

    train = result["sections"]["train"]
    for mode in sections.MODES:
        figures_or_skip(train["rows"][f"tinyddpm/{mode}"], "img_s")
        if result["device"].get("diffusers"):  # both layouts, but only the faster one compiled
            rows = [train["rows"][f"{d}/{mode}"] for d in sections.DIFFUSERS if f"{d}/{mode}" in train["rows"]]
            assert len(rows) == (1 if mode == "bf16-compile" else 2)
            for r in rows:
                figures_or_skip(r, "img_s")
            assert train["rows"][f"tinyddpm/{mode}"]["vs_diffusers"] > 0
            assert train["systems"]["diffusers"]["params"] == train["systems"]["tinyddpm"]["params"]
        else:
            assert "not importable" in train["systems"]["diffusers"]["skipped"]
    assert train["rows"]["tinyddpm/fp32"]["mfu"] is None  # no peak known for a CPU
    figures_or_skip(train["loop"]["eager"], "img_s")
    assert train["loop"]["compile"]["skipped"]

    sample = result["sections"]["sample"]
    for variant in sections.SAMPLE_VARIANTS:
        figures_or_skip(sample["rows"][f"tinyddpm/{variant}"], "img_steps_s")
    assert "CUDA" in sample["rows"]["tinyddpm/cuda-graph"]["skipped"]
    assert sample["sampler"]["wall_s"] > 0 and sample["sampler"]["finite"]

    fid = result["sections"]["fid"]
    assert fid["rows"]["tinyddpm"]["img_s"] > 0 and np.isfinite(fid["rows"]["tinyddpm"]["fid"])
    ref = [r for k, r in fid["rows"].items() if k != "tinyddpm"]
    assert len(ref) == 1 and ("skipped" in ref[0] or ref[0]["fid_relative_diff"] >= 0)

    quality = result["sections"]["quality"]
    assert quality["steps"] == ev_mod.SMOKE.quality_steps and quality["train_exit_code"] == 0
    assert len(quality["reports"]) == len(ev_mod.SMOKE.report_variants)
    summary = quality["reports"][0]["summary"]
    assert summary["step"] == quality["steps"] and summary["results"][0]["fid"] is not None
    assert (out / "quality_0_report_grid.png").is_file()

    for heading in ("## Goals", "## Training throughput", "## Sampling throughput", "## FID throughput",
                    "## Quality", "Smoke run"):
        assert heading in md
    files = sorted(os.listdir(out))
    assert files[:2] == ["gpu_evidence.json", "gpu_evidence.md"] and len(files) <= 2 + 2 * len(quality["reports"])


def test_a_failing_or_slow_section_is_recorded_and_the_run_goes_on(tmp_path):
    sizes = dataclasses.replace(ev_mod.SMOKE, caps=dict(slow=0.3, broken=5, fine=5))
    args = SimpleNamespace(out=str(tmp_path), smoke=True, budget_s=30)
    ev = ev_mod.Evidence(args, sizes, torch.device("cpu"), str(tmp_path))

    def slow(ev, res):
        res["before"] = 1
        time.sleep(5)  # interrupted by the section's alarm

    def broken(ev, res):
        ev.attempt(res, "kept", lambda: dict(value=1.0))
        raise RuntimeError("boom\nsecond line")

    t, alarm = time.perf_counter(), signal.getsignal(signal.SIGALRM)
    for name, fn in (("slow", slow), ("broken", broken), ("fine", lambda ev, res: res.update(value=2))):
        ev_mod.run_section(ev, name, fn)
    assert time.perf_counter() - t < 4
    saved = json.loads((tmp_path / "gpu_evidence.json").read_text())["sections"]
    assert saved["slow"]["status"] == "timeout" and saved["slow"]["before"] == 1
    assert saved["broken"]["status"] == "failed" and saved["broken"]["error"] == "RuntimeError: boom"
    assert saved["broken"]["kept"]["value"] == 1.0  # measured before the failure: kept
    assert saved["fine"] == {**saved["fine"], "status": "ok", "value": 2}
    assert signal.getsignal(signal.SIGALRM) == alarm and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_sigterm_after_stops_train_py_with_a_checkpoint(tmp_path):
    """The quality run's clock: SIGTERM makes train.py save a checkpoint and return 128 + 15, also when the time is
    up before train.py has installed its handler (here at once: the clock waits for the handler)."""
    from tinyddpm.checkpoint import load_checkpoint

    train_images, _ = bundle.toy_images(8, np.random.default_rng(0))
    data = bundle.write_cifar_layout(str(tmp_path / "data"), train_images, train_images[:2])
    run = tmp_path / "run"
    argv = ["--dataset", "cifar", "--class", "cat", "--data-dir", data, "--preset", "tiny", "--device", "cpu",
            "--out", str(run), "--steps", "400", "--batch-size", "2", "--log-every", "1", "--save-every", "400",
            "--sample-every", "400"]
    before = signal.getsignal(signal.SIGTERM)
    with sections.sigterm_after(0):
        code = sections.train_script_main(argv)
    assert code == 128 + signal.SIGTERM
    step = load_checkpoint(str(run / "ckpt.pt"))["step"]
    assert 0 < step < 400 and sections.read_log(str(run))[-1]["step"] <= step
    assert signal.getsignal(signal.SIGTERM) == before  # restored afterwards


def test_cats_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(1)
    (train, train_jpegs), (test, test_jpegs) = bundle.toy_images(6, rng), bundle.toy_images(3, rng)
    for jpegs in (dict(train=train_jpegs, test=test_jpegs), None):  # the JPEG files, then raw pixels
        path = tmp_path / "cats.npz"
        bundle.pack_cats(str(path), dict(train=train, test=test), jpegs)
        splits, verified = bundle.unpack_cats(str(path))
        assert verified == dict(train=True, test=True)
        assert np.array_equal(splits["train"], train) and np.array_equal(splits["test"], test)
    root = bundle.write_cifar_layout(str(tmp_path / "data"), train, test)
    assert np.array_equal(load_cifar10(root, "train", ["cat"], download=False)[0], train)  # same order
    assert np.array_equal(load_cifar10(root, "test", ["cat"], download=False)[0], test)
    assert len(load_cifar10(root, "train", ["dog"], download=False)[0]) == 0

    with np.load(path) as z:  # a wrong checksum is reported, not hidden
        arrays = dict(z)
    arrays["test_sha256"] = np.array("0" * 64)
    np.savez(path, **arrays)
    assert bundle.unpack_cats(str(path))[1] == dict(train=True, test=False)


def test_make_cats_uses_the_jpeg_files_only_when_they_decode_exactly(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    (train, train_jpegs), (test, test_jpegs) = bundle.toy_images(5, rng), bundle.toy_images(2, rng)
    data = bundle.write_cifar_layout(str(tmp_path / "data"), train, test)
    monkeypatch.setattr(bundle, "TRAIN_CATS", 5)
    monkeypatch.setattr(bundle, "TEST_CATS", 2)

    def zip_of(files):
        path = tmp_path / "jpegs.zip"
        with zipfile.ZipFile(path, "w") as z:
            for name, data_ in files.items():
                z.writestr(name, data_)
        return str(path)

    shuffled = {f"train/cat/{i:04d}.jpg": b for i, b in enumerate(reversed(train_jpegs))}  # any order
    shuffled.update({f"test/cat/{i:04d}.jpg": b for i, b in enumerate(test_jpegs)})
    assert bundle.make_cats(str(tmp_path), data, zip_of(shuffled), pixels=False) == "jpeg"
    splits, verified = bundle.unpack_cats(str(tmp_path / bundle.CATS))
    assert all(verified.values()) and np.array_equal(splits["train"], train)

    shuffled["test/cat/0001.jpg"] = train_jpegs[0]  # one test cat has no matching file: raw pixels instead
    assert bundle.make_cats(str(tmp_path), data, zip_of(shuffled), pixels=False) == "pixels"
    assert bundle.make_cats(str(tmp_path), data, "no-such.zip", pixels=False) == "pixels"
    monkeypatch.setattr(bundle, "TEST_CATS", 3)
    with pytest.raises(UserError, match="expected 3"):
        bundle.make_cats(str(tmp_path), data, "no-such.zip", pixels=True)


def test_stand_in_weights_when_none_are_found(tmp_path, monkeypatch):
    from tinyddpm import inception

    def nothing(*a, **k):
        raise UserError("no weights")

    monkeypatch.setattr(inception, "find_weights", nothing)
    how = bundle.make_toy_bundle(str(tmp_path))
    monkeypatch.undo()
    assert "stand-in" in how
    state = torch.load(tmp_path / bundle.WEIGHTS, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values()) and not any("num_batches" in k for k in state)
    model = inception.load_inception(str(tmp_path / bundle.WEIGHTS))  # the float16 file loads as FID weights
    assert model.flavour == "fid"


def test_pytorch_fid_gets_our_weights_where_it_loads_them(tmp_path, monkeypatch):
    """pytorch-fid is not installed here (it needs torchvision): a stand-in module loads the checkpoint from where
    pytorch-fid's load_state_dict_from_url looks, so a renamed helper or path breaks this test, not the GPU run."""
    import types

    from tinyddpm.inception import FID_WEIGHTS_NAME, FIDInceptionV3

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()
            path = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)
            self.state = torch.load(path, weights_only=True)

        def forward(self, x):  # [B, 3, H, W] → [[B, 2048, 1, 1]], as pytorch-fid's blocks output
            return [x.mean(dim=(2, 3), keepdim=True).repeat(1, 683, 1, 1)[:, :2048]]

    module = types.ModuleType("pytorch_fid.inception")
    module.InceptionV3 = InceptionV3
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    weights = str(tmp_path / "w.pth")
    bundle.write_fp16_weights(FIDInceptionV3().state_dict(), weights)
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        ev = SimpleNamespace(weights=weights, device=torch.device("cpu"), sizes=SimpleNamespace(fid_batch=2))
        name, features = fid_section.pytorch_fid_extractor(ev)
        assert name == "pytorch-fid" and features(np.zeros((3, 32, 32, 3), np.uint8)).shape == (3, 2048)
    finally:
        torch.hub.set_dir(hub)


def test_size_check(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.bin").write_bytes(b"0" * 1000)
    repo, files = bundle.check_size(str(tmp_path / "b"), ROOT)
    assert files == {"x.bin": 1000} and repo > 0 and "travels:" in capsys.readouterr().out
    with pytest.raises(UserError, match="MB, over the"):
        bundle.check_size(str(tmp_path / "b"), ROOT, limit=repo + 999)


def test_goals_are_read_off_the_result():
    result = dict(sections=dict(
        train=dict(rows={"tinyddpm/bf16": dict(img_s=300.0), "tinyddpm/bf16-compile": dict(img_s=450.0),
                         "diffusers/bf16-compile": dict(img_s=200.0), "diffusers-cl/bf16-compile": dict(img_s=250.0),
                         "diffusers/fp32": dict(img_s=900.0)}),
        sample=dict(rows={"tinyddpm/eager": dict(img_steps_s=10.0), "diffusers/compiled": dict(img_steps_s=8.0),
                          "diffusers-cl/eager": dict(img_steps_s=9.0), "diffusers/cuda-graph": dict(skipped="x")}),
        quality=dict(reports=[dict(summary=dict(results=[dict(ratio=1.1, memorisation=dict(
            train_images=5000, inception=dict(fraction=0.04), pixels=dict(fraction=0.12)))]))])))
    measured = [m for _, m in sys.modules["gpu_evidence_md"].goals(result)]
    assert measured == [pytest.approx(1.8), pytest.approx(10 / 9), 1.1, 0.12]
    md = sys.modules["gpu_evidence_md"].markdown(result)
    assert "| 1.80× | yes |" in md and "| 1.11× | no |" in md and "| 1.10× | yes |" in md and "| 12.0% | no |" in md


def test_ratios_are_against_the_faster_diffusers_layout():
    rows = {"tinyddpm/bf16": dict(img_s=30.0), "diffusers/bf16": dict(img_s=10.0),
            "diffusers-cl/bf16": dict(img_s=20.0), "tinyddpm/fp32": dict(img_s=5.0), "diffusers/fp32": dict(error="x")}
    sections.add_ratios(rows, "img_s")
    assert rows["tinyddpm/bf16"]["vs_diffusers"] == 1.5 and "vs_diffusers" not in rows["tinyddpm/fp32"]
    assert sections.faster_diffusers(rows, "img_s", "bf16") == "diffusers-cl"
    assert sections.faster_diffusers(rows, "img_s", "fp32") is None


@pytest.mark.parametrize("argv,match", [
    (["--out", "FILE"], "is a file"),
    (["--out", "DIR"], "no CUDA GPU"),
    (["--out", "DIR", "--bundle", "nowhere", "--device", "cpu"], "no bundle in nowhere"),
])
def test_user_mistakes_are_one_line_errors(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "FILE").write_text("mine")
    argv = [str(tmp_path / a) if a in ("FILE", "DIR") else a for a in argv]
    assert run_cli(ev_mod.main, argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "FILE").read_text() == "mine"


def test_bundle_maker_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bundle, "SHARED_DATA", str(tmp_path / "no-shared"))
    monkeypatch.setattr(bundle, "ROOT", str(tmp_path))
    assert run_cli(bundle.main, ["--out", str(tmp_path / "b"), "--no-wheels"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: no CIFAR-10") and err.count("\n") == 1
