"""The matrix of bad inputs users give train.py, sample.py and fid.py.

Every case must end with exit code 2, one line on stderr (argparse's own errors: its usage plus one error line),
no traceback, and every file and folder that existed before exactly as it was (and nothing new left behind).
Images that are odd but fine (other sizes, grayscale, RGBA, palette, 16-bit, CMYK, upper-case extensions) are
not errors: `test_unusual_images_are_accepted` trains on them.
"""
import contextlib
import hashlib
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
import train
from tests.helpers import MICRO_FLAGS, make_image_folder
from tinyddpm.checkpoint import FORMAT_VERSION
from tinyddpm.errors import run_cli

SCRIPTS = {"train": train, "sample": sample, "fid": fid}
IS_ROOT = os.geteuid() == 0  # root reads and writes regardless of permissions: those cases are skipped
UNWRITABLE = "/proc/tinyddpm-no-such-dir/out"  # cannot be created even by root


# --- the files users point the scripts at -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Good and bad inputs, made once: images, folders, checkpoints, statistics files."""
    root = tmp_path_factory.mktemp("inputs")
    p = SimpleNamespace(root=root)
    p.imgs = make_image_folder(str(root / "imgs"))
    p.empty = root / "empty"
    p.empty.mkdir()
    p.texts = root / "texts"  # a folder of non-images
    p.texts.mkdir()
    (p.texts / "notes.txt").write_text("hello")
    (p.texts / "data.csv").write_text("a,b\n1,2\n")
    p.zero_png = root / "zero"  # only a zero-byte image
    p.zero_png.mkdir()
    (p.zero_png / "a.png").write_bytes(b"")
    good_png = open(os.path.join(p.imgs, "img0.png"), "rb").read()
    p.truncated_png = root / "truncated"
    p.truncated_png.mkdir()
    (p.truncated_png / "a.png").write_bytes(good_png[: len(good_png) // 2])
    p.fake_jpg = root / "fake"  # text saved under an image extension
    p.fake_jpg.mkdir()
    (p.fake_jpg / "photo.jpg").write_text("not really a jpeg")
    p.one_png = root / "one"
    p.one_png.mkdir()
    (p.one_png / "a.png").write_bytes(good_png)
    p.a_file = root / "file.txt"
    p.a_file.write_text("a file, not a folder")
    p.cifar_bad = root / "cifar"  # a CIFAR-10 tarball that is not one (a failed manual download)
    p.cifar_bad.mkdir()
    (p.cifar_bad / "cifar-10-python.tar.gz").write_bytes(b"<html>404</html>")

    # A real checkpoint (1 step of the micro U-Net) and damaged / foreign variants of it.
    p.run = root / "run"
    with contextlib.redirect_stderr(io.StringIO()):
        assert train.main(["--dataset", "folder", "--data-dir", p.imgs, "--image-size", "16", "--out", str(p.run),
                           "--steps", "1", *MICRO_FLAGS]) == 0
    p.ckpt = p.run / "ckpt.pt"
    good = p.ckpt.read_bytes()
    p.ckpt_zero, p.ckpt_half, p.ckpt_png = root / "zero.pt", root / "half.pt", root / "image.pt"
    p.ckpt_zero.write_bytes(b"")
    p.ckpt_half.write_bytes(good[: len(good) // 2])
    p.ckpt_png.write_bytes(good_png)
    state = torch.load(p.ckpt, weights_only=True)
    p.ckpt_newer, p.ckpt_kind, p.ckpt_plain = root / "newer.pt", root / "kind.pt", root / "plain.pt"
    torch.save({**state, "version": FORMAT_VERSION + 1}, p.ckpt_newer)
    torch.save({**state, "kind": "vae"}, p.ckpt_kind)
    torch.save(state["models"]["model"], p.ckpt_plain)  # a bare state_dict (what other projects save)
    p.ckpt_edited = root / "edited.pt"  # weights that do not fit the file's own config
    torch.save({**state, "models": {"model": {}, "ema": {}}}, p.ckpt_edited)
    for name, ck in (("run_zero", p.ckpt_zero), ("run_half", p.ckpt_half), ("run_edited", p.ckpt_edited)):
        (root / name).mkdir()
        (root / name / "ckpt.pt").write_bytes(ck.read_bytes())
        setattr(p, name, root / name)

    # FID inputs that need no Inception network to be refused.
    rng = np.random.default_rng(0)
    p.stats4, p.stats5 = root / "s4.npz", root / "s5.npz"
    np.savez(p.stats4, mu=rng.normal(size=4), sigma=np.eye(4))
    np.savez(p.stats5, mu=rng.normal(size=5), sigma=np.eye(5))
    p.stats_nan = root / "nan.npz"
    np.savez(p.stats_nan, mu=np.full(4, np.nan), sigma=np.eye(4))
    p.npz_zero, p.npz_junk = root / "zero.npz", root / "junk.npz"
    p.npz_zero.write_bytes(b"")
    p.npz_junk.write_bytes(b"PK\x03\x04 not really a zip")
    p.npy_float = root / "float.npy"
    np.save(p.npy_float, rng.random((4, 8, 8, 3)))
    p.npy_shape = root / "shape.npy"
    np.save(p.npy_shape, np.zeros((4, 8), np.uint8))
    return p


def train_args(w, out, *extra):
    return ["--dataset", "folder", "--data-dir", w.imgs, "--image-size", "16", "--out", str(out), *MICRO_FLAGS,
            "--steps", "2", *extra]


def sample_args(w, out, *extra):
    return ["--ckpt", str(w.ckpt), "--out", str(out), "--n", "2", "--steps", "2", "--device", "cpu", *extra]


# (script, case id, argv builder (w, tmp) → argv, words the error line must contain, setup or None)
T, S, F = "train", "sample", "fid"
CASES = [
    # train.py: data paths
    (T, "data-dir-missing", lambda w, t: train_args(w, t / "r", "--data-dir", str(t / "nope")), ["does not exist"]),
    (T, "data-dir-empty", lambda w, t: train_args(w, t / "r", "--data-dir", str(w.empty)), ["no images"]),
    (T, "data-dir-is-a-file", lambda w, t: train_args(w, t / "r", "--data-dir", str(w.a_file)), ["not a folder"]),
    (T, "data-dir-non-images", lambda w, t: train_args(w, t / "r", "--data-dir", str(w.texts)), ["no images"]),
    (T, "zero-byte-image", lambda w, t: train_args(w, t / "r", "--data-dir", str(w.zero_png)), ["could be read"]),
    (T, "truncated-image", lambda w, t: train_args(w, t / "r", "--data-dir", str(w.truncated_png)),
     ["could be read"]),
    (T, "text-named-jpg", lambda w, t: train_args(w, t / "r", "--data-dir", str(w.fake_jpg)), ["could be read"]),
    (T, "folder-without-data-dir", lambda w, t: ["--dataset", "folder", "--out", str(t / "r"), *MICRO_FLAGS],
     ["--data-dir"]),
    (T, "cifar-bad-tarball", lambda w, t: ["--dataset", "cifar", "--data-dir", str(w.cifar_bad), "--out",
                                           str(t / "r"), *MICRO_FLAGS], ["md5", "delete it"]),
    (T, "cifar-unknown-class", lambda w, t: ["--dataset", "cifar", "--class", "dragon", "--data-dir",
                                             str(w.cifar_bad), "--out", str(t / "r"), *MICRO_FLAGS], ["dragon"]),
    (T, "cifar-wrong-size", lambda w, t: ["--dataset", "cifar", "--data-dir", str(w.cifar_bad), "--out",
                                          str(t / "r"), *MICRO_FLAGS, "--image-size", "16"], ["--image-size 32"]),
    (T, "class-on-folder", lambda w, t: train_args(w, t / "r", "--class", "cat"), ["--class only applies"]),
    (T, "conditional-folder", lambda w, t: train_args(w, t / "r", "--conditional"), ["needs labels"]),
    # train.py: output folders and the checkpoints found in them
    (T, "out-is-a-file", lambda w, t: train_args(w, w.a_file), ["is a file"]),
    (T, "out-inside-a-file", lambda w, t: train_args(w, w.a_file / "run"), ["is a file"]),
    (T, "out-unwritable-fs", lambda w, t: train_args(w, UNWRITABLE), ["cannot write"]),
    (T, "out-zero-byte-ckpt", lambda w, t: train_args(w, w.run_zero), ["truncated or not a PyTorch file"]),
    (T, "out-truncated-ckpt", lambda w, t: train_args(w, w.run_half), ["truncated or not a PyTorch file"]),
    (T, "out-edited-ckpt", lambda w, t: train_args(w, w.run_edited), ["damaged"]),
    (T, "out-other-config", lambda w, t: train_args(w, w.run, "--base-channels", "64"), ["another config"]),
    (T, "out-other-data", lambda w, t: train_args(w, w.run, "--data-dir", str(w.one_png)), ["same data"]),
    # train.py: flags and values
    *[(T, f"{flag}={value}", (lambda f, v: lambda w, t: train_args(w, t / "r", f, v))(flag, value), [flag])
      for flag, value in [("--steps", "0"), ("--batch-size", "0"), ("--lr", "0"), ("--lr", "-1e-3"),
                          ("--lr", "nan"), ("--log-every", "0"), ("--save-every", "0"), ("--sample-every", "0"),
                          ("--grid-size", "0"), ("--grid-steps", "0"), ("--image-size", "0"),
                          ("--timesteps", "0"), ("--ema-decay", "1.5"), ("--dropout", "1"),
                          ("--cond-drop", "-0.1"), ("--warmup", "-1"), ("--grad-clip", "-1"),
                          ("--weight-decay", "nan"), ("--base-channels", "0"), ("--num-res-blocks", "0"),
                          ("--channel-mults", "0"), ("--attn-resolutions", "5"), ("--vlb-weight", "-1"),
                          ("--grid-eta", "-1"), ("--grid-eta", "nan")]],
    (T, "image-size-15", lambda w, t: train_args(w, t / "r", "--image-size", "15"), ["halved"]),
    (T, "base-channels-30", lambda w, t: train_args(w, t / "r", "--base-channels", "30"), ["GroupNorm groups"]),
    (T, "num-heads-3", lambda w, t: train_args(w, t / "r", "--attn-resolutions", "8", "--num-heads", "3"),
     ["--num-heads 3"]),
    (T, "device-cuda-without-gpu", lambda w, t: train_args(w, t / "r", "--device", "cuda"), ["--device cpu"]),
    (T, "device-unknown", lambda w, t: train_args(w, t / "r", "--device", "gpu0"), ["unknown device"]),
    (T, "skip-nonfinite-dcgan", lambda w, t: train_args(w, t / "r", "--model", "dcgan", "--skip-nonfinite"),
     ["--skip-nonfinite"]),
    (T, "argparse-not-a-number", lambda w, t: train_args(w, t / "r", "--steps", "ten"), ["--steps"]),
    (T, "argparse-unknown-flag", lambda w, t: train_args(w, t / "r", "--epochs", "3"), ["--epochs"]),
    (T, "argparse-unknown-preset", lambda w, t: train_args(w, t / "r", "--preset", "huge"), ["huge"]),
    (T, "argparse-unknown-schedule", lambda w, t: train_args(w, t / "r", "--schedule", "exp"), ["exp"]),
    # sample.py
    (S, "ckpt-missing", lambda w, t: sample_args(w, t / "s", "--ckpt", str(t / "nope.pt")), ["does not exist"]),
    (S, "ckpt-empty-folder", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.empty)), ["without ckpt.pt"]),
    (S, "ckpt-zero-byte", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.ckpt_zero)), ["truncated"]),
    (S, "ckpt-truncated", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.ckpt_half)), ["truncated"]),
    (S, "ckpt-is-an-image", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.ckpt_png)), ["truncated"]),
    (S, "ckpt-is-text", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.a_file)), ["truncated"]),
    (S, "ckpt-bare-state-dict", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.ckpt_plain)),
     ["not a tinyddpm checkpoint"]),
    (S, "ckpt-newer-version", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.ckpt_newer)),
     ["newer", "upgrade"]),
    (S, "ckpt-unknown-kind", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.ckpt_kind)), ["'vae'"]),
    (S, "ckpt-edited", lambda w, t: sample_args(w, t / "s", "--ckpt", str(w.ckpt_edited)), ["damaged"]),
    (S, "out-is-a-file", lambda w, t: sample_args(w, w.a_file), ["is a file"]),
    (S, "out-unwritable-fs", lambda w, t: sample_args(w, UNWRITABLE), ["cannot"]),
    *[(S, f"{flag}={value}", (lambda f, v: lambda w, t: sample_args(w, t / "s", f, v))(flag, value), [flag])
      for flag, value in [("--n", "0"), ("--batch-size", "0"), ("--steps", "0"), ("--eta", "-1"),
                          ("--cfg-scale", "-1")]],
    (S, "class-on-unconditional", lambda w, t: sample_args(w, t / "s", "--class", "cat"), ["unconditional"]),
    (S, "labels-on-unconditional", lambda w, t: sample_args(w, t / "s", "--labels", "red cube"),
     ["unconditional"]),
    (S, "device-cuda-without-gpu", lambda w, t: sample_args(w, t / "s", "--device", "cuda"), ["--device cpu"]),
    (S, "argparse-no-ckpt", lambda w, t: ["--n", "2"], ["--ckpt"]),
    (S, "argparse-n-not-a-number", lambda w, t: sample_args(w, t / "s", "--n", "many"), ["--n"]),
    # fid.py (the cases refused before the Inception network is loaded)
    (F, "argparse-no-inputs", lambda w, t: [], ["INPUT"]),
    (F, "three-inputs", lambda w, t: [str(w.stats4)] * 3, ["at most two"]),
    (F, "one-input-no-save-stats", lambda w, t: [str(w.stats4)], ["--save-stats"]),
    (F, "input-missing", lambda w, t: [str(t / "nope"), str(w.stats4)], ["does not exist"]),
    (F, "input-empty-folder", lambda w, t: [str(w.empty), str(w.stats4)], ["no images"]),
    (F, "input-non-images", lambda w, t: [str(w.texts), str(w.stats4)], ["no images"]),
    (F, "input-one-image", lambda w, t: [str(w.one_png), str(w.stats4)], ["only 1 image"]),
    (F, "input-text-file", lambda w, t: [str(w.a_file), str(w.stats4)], ["not a folder, .npz or .npy"]),
    (F, "input-zero-byte-npz", lambda w, t: [str(w.npz_zero), str(w.stats4)], ["cannot read"]),
    (F, "input-corrupt-npz", lambda w, t: [str(w.npz_junk), str(w.stats4)], ["cannot read"]),
    (F, "input-float-npy", lambda w, t: [str(w.npy_float), str(w.stats4)], ["uint8"]),
    (F, "input-wrong-shape-npy", lambda w, t: [str(w.npy_shape), str(w.stats4)], ["shape"]),
    (F, "stats-with-nan", lambda w, t: [str(w.stats_nan), str(w.stats4)], ["NaN"]),
    (F, "stats-of-other-sizes", lambda w, t: [str(w.stats4), str(w.stats5)], ["different sizes"]),
    (F, "kid-with-stats", lambda w, t: [w.imgs, str(w.stats4), "--kid"], ["--kid"]),
    (F, "save-stats-exists", lambda w, t: [w.imgs, "--save-stats", str(w.stats4)], ["--force"]),
    (F, "save-stats-not-npz", lambda w, t: [w.imgs, "--save-stats", str(t / "s.txt")], [".npz"]),
    (F, "save-stats-of-stats", lambda w, t: [str(w.stats4), "--save-stats", str(t / "s.npz")],
     ["already is a statistics file"]),
    (F, "batch-size-0", lambda w, t: [str(w.stats4), str(w.stats4), "--batch-size", "0"], ["--batch-size"]),
    (F, "argparse-batch-not-a-number", lambda w, t: [str(w.stats4), str(w.stats4), "--batch-size", "x"],
     ["--batch-size"]),
]
# Permission cases (skipped as root): unreadable data, unwritable outputs.
PERMISSION_CASES = [
    (T, "data-dir-unreadable", "imgs", 0o000, lambda w, t: train_args(w, t / "r", "--data-dir", str(t / "imgs")),
     ["could not", "denied"]),
    (T, "image-unreadable", "imgs/img0.png", 0o000,
     lambda w, t: train_args(w, t / "r", "--data-dir", str(t / "imgs")), ["img0.png"]),
    (T, "out-read-only", "ro", 0o500, lambda w, t: train_args(w, t / "ro" / "run"), ["permission denied"]),
    (S, "out-read-only", "ro", 0o500, lambda w, t: sample_args(w, t / "ro" / "s"), ["denied"]),
]


def snapshot(*roots):
    """Every path below the roots with its kind, permissions and content hash."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                digest = None
                if os.path.isfile(path) and os.access(path, os.R_OK):
                    with open(path, "rb") as f:
                        digest = hashlib.sha1(f.read()).hexdigest()
                state[path] = (st.st_mode, digest)
    return state


def run_case(script, argv, capsys):
    try:
        code = run_cli(SCRIPTS[script].main, argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, words):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if lines and "usage:" in err:  # argparse: usage lines, then "<prog>: error: ..."
        lines = [ln for ln in lines if ": error: " in ln]
    assert len(lines) == 1 and "error: " in lines[0], err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def case_id(c):
    values = c.values if hasattr(c, "values") else c
    return f"{values[0]}:{values[1]}"


@pytest.mark.parametrize("script, case, argv_of, words", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input(w, tmp_path, capsys, script, case, argv_of, words):
    argv = argv_of(w, tmp_path)
    before = snapshot(w.root, tmp_path)
    code, _, err = run_case(script, argv, capsys)
    assert_one_line_error(code, err, words)
    assert snapshot(w.root, tmp_path) == before


@pytest.mark.skipif(IS_ROOT, reason="root reads and writes regardless of permissions")
@pytest.mark.parametrize("script, case, target, mode, argv_of, words", PERMISSION_CASES,
                         ids=[f"{c[0]}:{c[1]}" for c in PERMISSION_CASES])
def test_bad_permissions(w, tmp_path, capsys, script, case, target, mode, argv_of, words):
    make_image_folder(str(tmp_path / "imgs"))
    (tmp_path / "ro").mkdir()
    path = tmp_path / target
    path.chmod(mode)
    try:
        argv = argv_of(w, tmp_path)
        code, _, err = run_case(script, argv, capsys)
    finally:
        path.chmod(0o700)
    assert code == 2 and "Traceback" not in err, err
    assert any(word.lower() in err.lower() for word in words), err


def test_unusual_images_are_accepted(tmp_path, capsys):
    """Other sizes, grayscale, RGBA, palette, 16-bit, CMYK JPEG and upper-case extensions all train."""
    d = tmp_path / "mixed"
    make_image_folder(str(d), n=2)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(d / "gray.png")
    rgb.convert("RGBA").save(d / "rgba.PNG")
    rgb.convert("P").save(d / "palette.bmp")
    rgb.convert("CMYK").save(d / "cmyk.JPG")
    Image.fromarray(rng.integers(0, 65536, (30, 20), dtype=np.uint16)).save(d / "sixteen.png")
    code, _, err = run_case("train", ["--dataset", "folder", "--data-dir", str(d), "--image-size", "16", "--out",
                                      str(tmp_path / "r"), *MICRO_FLAGS, "--steps", "1"], capsys)
    assert code == 0, err
    assert "on 7 images" in err and "warning" not in err
