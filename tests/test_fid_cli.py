"""fid.py in-process on small folders of real CIFAR-10 images, and every bad input (exit 2, one line)."""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import fid
from tinyddpm.errors import run_cli
from tinyddpm.inception import FIDInceptionV3

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load:DeprecationWarning")


def cifar_uint8(cifar_root, n, batch="test_batch", offset=0):
    with open(os.path.join(cifar_root, "cifar-10-batches-py", batch), "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return np.asarray(d["data"][offset:offset + n]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


@pytest.fixture(scope="module")
def folders(cifar_root, tmp_path_factory):
    """dirA: 3 CIFAR test PNGs plus grayscale / RGBA / palette images of other sizes, upper-case extensions and a
    subfolder; dirB: 3 CIFAR train PNGs (also as b.npy)."""
    root = tmp_path_factory.mktemp("fid")
    a, b = root / "dirA", root / "dirB"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    for i, im in enumerate(cifar_uint8(cifar_root, 3)):
        Image.fromarray(im).save(a / f"{i}.png")
    big = Image.fromarray(cifar_uint8(cifar_root, 1, offset=5)[0]).resize((40, 48))
    big.convert("L").save(a / "sub" / "gray.JPG")
    big.convert("RGBA").save(a / "rgba.PNG")
    big.convert("P").save(a / "palette.bmp")
    train = cifar_uint8(cifar_root, 3, batch="data_batch_1")
    for i, im in enumerate(train):
        Image.fromarray(im).save(b / f"{i}.png")
    np.save(root / "b.npy", train)
    return root


def run(argv, capsys):
    code = run_cli(fid.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_fid_stats_files_and_cache_agree(folders, capsys):
    a, b, cache = str(folders / "dirA"), str(folders / "dirB"), str(folders / "cache")
    code, out, err = run([a, b, "--cache-dir", cache, "--num-workers", "1", "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.startswith("FID: ") and len(out.strip().splitlines()) == 1
    value = float(out.split()[1])
    assert value > 0 and "img/s" in err and "FID is biased" in err and "Traceback" not in err

    sa, sb = str(folders / "a.npz"), str(folders / "b_from_npy.npz")
    code, out, err = run([a, "--save-stats", sa, "--cache-dir", cache], capsys)
    assert code == 0 and "from cache" in err  # dirA was measured once
    assert run([str(folders / "b.npy"), "--save-stats", sb], capsys)[0] == 0  # dirB's pixels as an array
    code, out, err = run([sa, sb], capsys)  # stats on both sides: no Inception needed
    assert code == 0 and float(out.split()[1]) == pytest.approx(value, rel=1e-6)
    with np.load(sa) as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)

    code, out, err = run([sa, sb, "--kid"], capsys)
    assert code == 2 and "needs image features" in err

    code, out, err = run([b, "--save-stats", sa], capsys)  # refuses to overwrite
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1


def test_skip_bad(folders, tmp_path, capsys):
    d = tmp_path / "withbad"
    d.mkdir()
    for name in ("0.png", "1.png"):
        (d / name).write_bytes((folders / "dirB" / name).read_bytes())
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    code, out, err = run([str(d), "--save-stats", str(tmp_path / "s.npz"), "--num-workers", "0"], capsys)
    assert code == 2 and "corrupt.jpg" in err and "--skip-bad" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2  # the weights line, then the error
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "s.npz").exists()
    code, out, err = run([str(d), "--save-stats", str(tmp_path / "s.npz"), "--skip-bad", "--num-workers", "0"],
                         capsys)
    assert code == 0 and "skipped 1" in err and (tmp_path / "s.npz").exists()


def test_torchvision_flavour_is_labelled_and_kid(folders, tmp_path, capsys):
    import torch

    state = FIDInceptionV3("torchvision-imagenet").state_dict()
    state.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "inception_v3_google-0cc3c7bd.pth")
    b = str(folders / "dirB")
    code, out, err = run([b, str(folders / "b.npy"), "--weights", str(tmp_path / "inception_v3_google-0cc3c7bd.pth"),
                          "--num-workers", "0", "--kid", "--kid-subsets", "4"], capsys)
    assert code == 0, err
    fid_line, kid_line = out.strip().splitlines()
    assert "not a standard FID" in fid_line and "NOT comparable" in err
    assert abs(float(fid_line.split()[1])) < 1e-3  # same images on both sides
    assert kid_line.startswith("KID: ") and "±" in kid_line


def bad_inputs(root):
    """(argv, text the one-line error must contain) for every bad input of the issue."""
    os.makedirs(root / "empty", exist_ok=True)
    os.makedirs(root / "single", exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "single" / "x.png")
    np.savez(root / "wrongkeys.npz", mean=np.zeros(4), cov=np.eye(4))
    np.savez(root / "wrongshape.npz", mu=np.zeros(4), sigma=np.eye(3))
    np.savez(root / "ok.npz", mu=np.zeros(4), sigma=np.eye(4))
    (root / "notweights.pth").write_bytes(b"hello")
    (root / "exists.npz").write_bytes(b"precious")
    good = str(root / "single" / "..")
    return [
        ([str(root / "missing"), str(root / "ok.npz")], "does not exist"),
        ([str(root / "empty"), str(root / "ok.npz")], "no images"),
        ([str(root / "single"), str(root / "ok.npz")], "only 1 image"),
        ([str(root / "wrongkeys.npz"), str(root / "ok.npz")], "mu and sigma"),
        ([str(root / "wrongshape.npz"), str(root / "ok.npz")], "covariance"),
        ([str(root / "ok.npz"), str(root / "ok.npz"), str(root / "ok.npz")], "at most two"),
        ([str(root / "ok.npz")], "--save-stats"),
        ([good, "--save-stats", str(root / "exists.npz")], "--force"),
        ([good, "--save-stats", str(root / "out.txt")], ".npz"),
        ([good, str(root / "ok.npz"), "--kid"], "needs image features"),
        ([good, good, "--weights", str(root / "notweights.pth")], "not an Inception"),
        ([good, good, "--weights", str(root / "nothere.pth")], "do not exist"),
        ([good, good, "--batch-size", "0"], "--batch-size"),
        ([good, good, "--device", "cuda:7" if not __import__("torch").cuda.is_available() else "nodevice"], "device"),
    ]


def test_bad_inputs_exit_2_one_line(tmp_path, capsys):
    (tmp_path / "single" / "more").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "single" / "more" / "y.png")  # `good` = a folder with 2 images
    cases = bad_inputs(tmp_path)
    for argv, expected in cases:
        if expected == "only 1 image":
            argv = [str(tmp_path / "single" / "more"), argv[1]]
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert out == "", argv
        lines = [l for l in err.strip().splitlines() if not l.startswith("weights:")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (argv, err)
        assert "Traceback" not in err
    assert (tmp_path / "exists.npz").read_bytes() == b"precious"
