"""The shapes evaluator: the i-CLEVR accuracy on hand-made logits, a short training that must learn, the
checkpoint round trip (plain dict, weights_only) and the command line in-process, with each error path."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tinyddpm import evaluator as ev
from tinyddpm import shapes
from tinyddpm.errors import UserError, run_cli

# A short run at 32 px (~20 s CPU). Chance is ~0.1 (k random labels out of 24) and a model that
# learned only colours or only shapes gets about 1/3; the full evaluator reaches ≥ 0.99 (docs/shapes.md).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ev.EvaluatorTraining(size=32, n_train=3000, steps=300, batch_size=32, n_heldout=400, seed=0)
SHORT_MIN_ACCURACY = 0.5


def _multi_hot(rows):
    out = torch.zeros(len(rows), 24)
    for i, row in enumerate(rows):
        out[i, list(row)] = 1.0
    return out


def test_iclevr_accuracy_on_hand_made_logits():
    labels = _multi_hot([[0, 1], [3], [5, 6, 7]])
    logits = torch.full((3, 24), -5.0)
    logits[0, [0, 9]] = 5.0  # top-2 = {0, 9}: 1 of 2 right
    logits[1, 3] = 1.0  # top-1 = {3}: right
    logits[2, [5, 6, 20]] = torch.tensor([3.0, 2.0, 4.0])  # top-3 = {20, 5, 6}: 2 of 3 right; 7 ranks 4th
    assert ev.iclevr_accuracy(logits, labels) == pytest.approx(4 / 6)  # averaged over all 6 objects, not images
    assert ev.iclevr_accuracy(labels * 2 - 1, labels) == 1.0
    assert ev.iclevr_accuracy(-labels, labels) == 0.0
    # Only the ranking matters: any increasing transform of the logits gives the same figure.
    assert ev.iclevr_accuracy(torch.sigmoid(logits), labels.numpy()) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        ev.iclevr_accuracy(logits[:2], labels)
    with pytest.raises(ValueError):
        ev.iclevr_accuracy(logits, torch.zeros(3, 24))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaluator") / "evaluator.pt"
    lines, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # this small network gains little from a second thread, and loses much on a busy machine
    try:
        model, metrics = ev.train_evaluator(path, SHORT, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return path, model, metrics, lines


def test_short_training_learns_well_above_chance(trained):
    path, model, metrics, lines = trained
    assert metrics["heldout_accuracy"] > SHORT_MIN_ACCURACY, metrics
    assert any("held-out accuracy" in line for line in lines)
    # The figure is on test-split scenes: recompute it on freshly rendered ones.
    images, labels = shapes.make_dataset("test", 200, size=32, seed=99)
    assert ev.evaluate_images(model, images, labels) > SHORT_MIN_ACCURACY


def test_checkpoint_is_a_plain_dict_and_round_trips(trained):
    path, model, metrics, _ = trained
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "shapes-evaluator" and raw["config"]["size"] == 32
    assert raw["config"]["vocab"] == list(shapes.VOCAB) and raw["metrics"] == metrics
    loaded = ev.load_evaluator(path)
    images, labels = shapes.make_dataset("test", 64, size=32, seed=5)
    assert torch.equal(ev.predict(loaded, images), ev.predict(model, images))
    # uint8 [N, H, W, 3] and float [N, 3, H, W] in [-1, 1] are the same images to it.
    floats = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert ev.evaluate_images(loaded, floats, labels) == ev.evaluate_images(loaded, images, labels)
    with pytest.raises(UserError, match="trained at 32×32"):
        ev.evaluate_images(loaded, shapes.make_dataset("test", 2, size=64)[0], labels[:2])


def test_evaluator_works_at_64_px():
    model = ev.Evaluator(64).eval()
    images, labels = shapes.make_dataset("test", 4, size=64)
    assert ev.predict(model, images).shape == (4, 24)
    assert 0.0 <= ev.evaluate_images(model, images, labels) <= 1.0


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ev.load_evaluator(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="refused|cannot read"):
        ev.load_evaluator(tmp_path / "junk.pt")
    torch.save({"format": "tinyddpm", "kind": "ddpm"}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a tinyddpm shapes evaluator"):
        ev.load_evaluator(tmp_path / "other.pt")
    torch.save({"x": np.arange(3)}, tmp_path / "pickled.pt")  # numpy objects: refused by weights_only
    with pytest.raises(UserError, match="refused|cannot read"):
        ev.load_evaluator(tmp_path / "pickled.pt")


def test_main_in_process(tmp_path, capsys):
    out = tmp_path / "sub" / "ev.pt"
    argv = ["--out", str(out), "--size", "32", "--steps", "3", "--n-train", "64", "--heldout", "32",
            "--batch-size", "8", "--threads", "1"]
    assert run_cli(ev.main, argv) == 0
    assert "heldout_accuracy" in capsys.readouterr().out
    assert ev.load_evaluator(out).config["size"] == 32
    before = out.read_bytes()
    assert run_cli(ev.main, argv) == 2  # never replaces a file unless told to
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert run_cli(ev.main, argv + ["--force"]) == 0


@pytest.mark.parametrize("extra, says", [
    (["--steps", "0"], "steps must be at least 1"),
    (["--device", "nonsense"], "unknown device"),
])
def test_main_errors_are_one_line(tmp_path, capsys, extra, says):
    assert run_cli(ev.main, ["--out", str(tmp_path / "ev.pt")] + extra) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "ev.pt").exists()


def test_out_folder_is_refused_by_the_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinyddpm.evaluator", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "is a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
