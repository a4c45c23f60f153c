"""tinyddpm.data: the CIFAR-10 reader and downloader, image folders, flips and the resumable BatchSampler."""
import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hang_guard import fails_instead_of_hanging
from tinyddpm import data
from tinyddpm.config import DataConfig
from tinyddpm.errors import UserError, run_cli
from tinyddpm.imageio import load_rgb, scan_images

CATS_TRAIN, CATS_TEST = 5000, 1000  # CIFAR-10 has 6,000 images per class: 5,000 train and 1,000 test


def run_error(capsys, fn, notices=0):
    """Run fn through run_cli as a script would: exit code 2, one error line on stderr (after `notices` progress
    lines), no traceback."""
    rc = run_cli(lambda argv: fn())
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()[notices:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------------ classes
def test_resolve_classes():
    assert data.resolve_classes(()) == list(range(10)) and data.resolve_classes(None) == list(range(10))
    assert data.resolve_classes("cat") == [3] and data.resolve_classes(3) == [3] and data.resolve_classes("3") == [3]
    assert data.resolve_classes(["Dog", "1", 3, "dog"]) == [5, 1, 3]  # order kept, duplicates dropped
    assert data.resolve_classes(np.int64(9)) == [9] and data.resolve_classes(("truck", " ship ")) == [9, 8]
    assert len(data.CIFAR10_CLASSES) == 10 and data.CIFAR10_CLASSES[9] == "truck"


@pytest.mark.parametrize("bad", ["kitten", 10, "-1", "12"])
def test_unknown_class_lists_the_valid_ones(bad):
    with pytest.raises(UserError) as e:
        data.resolve_classes(["cat", bad])
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg and all(n in msg for n in data.CIFAR10_CLASSES)


# ------------------------------------------------------------------------------------------- CIFAR-10 on disk
def _raw_batch(cifar_root, name):
    with open(os.path.join(cifar_root, "cifar-10-batches-py", name), "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return d["data"], np.array(d["labels"])


def test_cifar_cats_train_and_test(cifar_root):
    x, y = data.load_cifar10(cifar_root, "train", ["cat"], download=False)
    assert x.shape == (CATS_TRAIN, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (CATS_TRAIN,) and y.dtype == np.int64 and (y == 3).all()
    x, y = data.load_cifar10(cifar_root, "test", 3, download=False)
    assert x.shape == (CATS_TEST, 32, 32, 3) and (y == 3).all()
    # Layout: row i of the file holds the R, G, B planes; ours is the same image channels-last, in file order.
    raw, labels = _raw_batch(cifar_root, "test_batch")
    rows = raw[labels == 3]
    np.testing.assert_array_equal(x, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert x.std() > 30  # real photographs, not a constant


def test_cifar_all_classes_and_split_error(cifar_root):
    x, y = data.load_cifar10(cifar_root, "test", download=False)
    assert x.shape == (10000, 32, 32, 3) and np.bincount(y).tolist() == [1000] * 10
    with pytest.raises(UserError, match="train or test"):
        data.load_cifar10(cifar_root, "val", download=False)


def test_load_dataset_cifar_relabels_in_requested_order(cifar_root):
    cfg = DataConfig(dataset="cifar", data_dir=cifar_root, classes=("dog", "3"))
    images, labels, names = data.load_dataset(cfg, split="test", download=False)
    assert images.shape == (2 * CATS_TEST, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and names == ["dog", "cat"]
    assert torch.bincount(labels).tolist() == [CATS_TEST, CATS_TEST]
    dogs, _ = data.load_cifar10(cifar_root, "test", ["dog"], download=False)
    np.testing.assert_array_equal(images[labels == 0].permute(0, 2, 3, 1).numpy(), dogs)


def test_load_dataset_errors(tmp_path, cifar_root):
    with pytest.raises(UserError, match="only applies"):
        data.load_dataset(DataConfig(dataset="shapes", classes=("cat",)))
    with pytest.raises(UserError, match="image-size 32"):
        data.load_dataset(DataConfig(dataset="cifar", data_dir=cifar_root, image_size=64))
    with pytest.raises(UserError, match="only applies"):
        data.load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), classes=("cat",)))


# --------------------------------------------------------------------------------------------------- download
@pytest.fixture(scope="module")
def tarball_md5(cifar_root):
    h = hashlib.md5()
    with open(os.path.join(cifar_root, data.CIFAR10_TARBALL), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def server_url(cifar_root):
    """An HTTP server on 127.0.0.1 serving the fixture folder (with cifar-10-python.tar.gz)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=cifar_root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{data.CIFAR10_TARBALL}"
    server.shutdown()
    server.server_close()


def test_download_good_md5(tmp_path, server_url, tarball_md5):
    root = tmp_path / "data"  # does not exist yet: created
    batches = data.download_cifar10(root, url=server_url, md5=tarball_md5)
    assert batches == os.path.join(root, "cifar-10-batches-py")
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]  # no temp files left
    x, y = data.load_cifar10(root, "test", "cat", download=False)
    assert x.shape == (CATS_TEST, 32, 32, 3) and (y == 3).all()
    # A second call finds the data and touches nothing (an unreachable URL proves it does not download).
    assert data.download_cifar10(root, url="http://127.0.0.1:9/none", md5=tarball_md5) == batches


def test_download_bad_md5_leaves_nothing(tmp_path, server_url, capsys):
    line = run_error(capsys, lambda: data.load_cifar10(tmp_path, "test", url=server_url, md5="0" * 32), notices=1)
    assert "md5" in line and "0" * 32 in line
    assert os.listdir(tmp_path) == []  # no partial file, no tarball, no half-extracted folder


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{data.CIFAR10_TARBALL}"  # nothing listens there any more


def test_download_unreachable_says_where_to_put_the_tarball(tmp_path, capsys):
    line = run_error(capsys, lambda: data.load_cifar10(tmp_path, url=_closed_port_url()))
    assert "put cifar-10-python.tar.gz" in line and "cifar-10-batches-py/" in line and str(tmp_path) in line
    assert os.listdir(tmp_path) == []
    line = run_error(capsys, lambda: data.load_cifar10(tmp_path / "x", download=False))  # offline mode: same advice
    assert "put cifar-10-python.tar.gz" in line


def test_present_tarball_is_verified_and_extracted(tmp_path, cifar_root, tarball_md5):
    os.symlink(os.path.join(cifar_root, data.CIFAR10_TARBALL), tmp_path / data.CIFAR10_TARBALL)
    x, _ = data.load_cifar10(tmp_path, "test", "cat", download=False, md5=tarball_md5)
    assert x.shape == (CATS_TEST, 32, 32, 3)
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_present_tarball_with_bad_md5_is_reported_and_kept(tmp_path, capsys):
    root, md5 = _tar_with(tmp_path, "cifar-10-batches-py/readme.txt")
    line = run_error(capsys, lambda: data.load_cifar10(root, download=True, md5="f" * 32))  # no download tried
    assert f"has md5 {md5}, expected {'f' * 32}" in line
    assert os.listdir(root) == [data.CIFAR10_TARBALL]  # the user's file is kept, nothing extracted


def _tar_with(tmp_path, member):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    root = tmp_path / "root"
    root.mkdir()
    (root / data.CIFAR10_TARBALL).write_bytes(buf.getvalue())
    return root, hashlib.md5(buf.getvalue()).hexdigest()


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/tinyddpm-evil.txt", "cifar-10-batches-py/../../evil.txt"])
def test_unsafe_tar_members_are_refused(tmp_path, member, capsys):
    root, md5 = _tar_with(tmp_path, member)
    line = run_error(capsys, lambda: data.load_cifar10(root, download=False, md5=md5))
    assert "unsafe member" in line
    assert os.listdir(root) == [data.CIFAR10_TARBALL] and os.listdir(tmp_path) == ["root"]
    assert not os.path.exists("/tmp/tinyddpm-evil.txt")


def test_tar_without_cifar_is_refused(tmp_path):
    root, md5 = _tar_with(tmp_path, "something/else.txt")
    with pytest.raises(UserError, match="complete cifar-10-batches-py"):
        data.load_cifar10(root, download=False, md5=md5)
    assert os.listdir(root) == [data.CIFAR10_TARBALL]


def test_incomplete_batches_folder_is_not_overwritten(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"mine")
    with pytest.raises(UserError, match="incomplete"):
        data.load_cifar10(tmp_path, download=False)
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"mine"


def test_foreign_pickle_is_not_executed(tmp_path, cifar_root):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in os.listdir(os.path.join(cifar_root, "cifar-10-batches-py")):
        os.symlink(os.path.join(cifar_root, "cifar-10-batches-py", name), batches / name)
    os.unlink(batches / "test_batch")
    (batches / "test_batch").write_bytes(pickle.dumps(print))  # a pickle that names an arbitrary global
    with pytest.raises(UserError, match="cannot read"):
        data.load_cifar10(tmp_path, "test", download=False)


# ----------------------------------------------------------------------------------------------- image folders
def _save(path, im, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, format=fmt)


def test_image_folder_modes_and_crop(tmp_path, capsys):
    size = 16
    # 64×32 (wide): left and right quarters red/blue, centre half green → the centre crop is all green.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = (255, 0, 0)
    wide[:, 16:48] = (0, 255, 0)
    wide[:, 48:] = (0, 0, 255)
    _save(tmp_path / "a" / "wide.PNG", Image.fromarray(wide))
    _save(tmp_path / "a" / "b" / "gray.JpG", Image.new("L", (20, 40), 128))
    _save(tmp_path / "a" / "b" / "c" / "clear.png", Image.new("RGBA", (24, 24), (10, 20, 30, 0)))
    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    _save(tmp_path / "pal.BMP", pal)
    _save(tmp_path / "deep.png", Image.fromarray(np.full((20, 20), 65535, np.uint16)))  # 16-bit white
    _save(tmp_path / "photo.WebP", Image.new("RGB", (50, 50), (1, 2, 250)), "WEBP")
    _save(tmp_path / "x.jpeg", Image.new("RGB", (17, 33), (40, 50, 60)))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")

    x = data.load_image_folder(tmp_path, size)
    assert x.shape == (7, size, size, 3) and x.dtype == np.uint8
    err = capsys.readouterr().err
    left_out, unreadable = err.strip().splitlines()
    assert "left out 1 entry" in left_out and "notes.txt" in left_out
    assert "skipped 1 unreadable" in unreadable and "broken.png" in unreadable
    readable = [p for p in scan_images(tmp_path)[0] if "broken" not in p]  # the order load_image_folder uses
    by_name = {os.path.basename(p).split(".")[0]: im for p, im in zip(readable, x)}
    c = by_name["wide"][:, 2:-2].astype(int)  # away from the borders, where LANCZOS may ring
    assert (np.abs(c - (0, 255, 0)) <= 2).all()
    assert (np.abs(by_name["gray"].astype(int) - 128) <= 3).all()  # JPEG is lossy
    assert (by_name["clear"] == 255).all()  # transparent → composited on white
    assert (by_name["pal"] == (200, 100, 50)).all()
    assert (by_name["deep"] == 255).all()  # 16-bit scaled to 8 bits, not clipped
    assert (np.abs(by_name["x"].astype(int) - (40, 50, 60)) <= 3).all()


def test_image_folder_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = run_error(capsys, lambda: data.load_image_folder(tmp_path / "empty", 8))
    assert "no images" in line
    line = run_error(capsys, lambda: data.load_image_folder(tmp_path / "missing", 8))
    assert "does not exist" in line
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    line = run_error(capsys, lambda: data.load_image_folder(bad, 8))
    assert "none of the 3" in line


def test_image_folder_leaves_out_fifos_loops_and_links_out_of_it(tmp_path, capsys):
    """The one folder scan (imageio.scan_images, fid.py's too): a FIFO named *.png is never opened (that would wait
    forever), and a linked folder outside the data folder (`up -> ..`: its sibling's images) is not searched."""
    imgs, sibling = tmp_path / "imgs", tmp_path / "sibling"
    for i in range(2):
        _save(imgs / f"{i}.png", Image.new("RGB", (8, 8), (i, 0, 0)))
    for i in range(4):
        _save(sibling / f"{i}.png", Image.new("RGB", (8, 8), (0, i, 0)))
    os.mkfifo(imgs / "pipe.png")
    (imgs / "up").symlink_to("..")
    (imgs / "again").symlink_to(".")
    with fails_instead_of_hanging():
        x = data.load_image_folder(imgs, 8)
    assert x[:, 0, 0].tolist() == [[0, 0, 0], [1, 0, 0]]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "left out 3 entries" in line and "not a regular file" in line and "outside" in line, line


def test_a_fifo_given_as_an_image_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with fails_instead_of_hanging(), pytest.raises(UserError, match="pipe.png is not a regular file"):
        load_rgb(str(tmp_path / "pipe.png"))


def test_load_dataset_folder(tmp_path):
    for i in range(3):
        _save(tmp_path / f"{i}.png", Image.new("RGB", (40, 30), (i, 0, 0)))
    images, labels, names = data.load_dataset(DataConfig(dataset="folder", data_dir=str(tmp_path), image_size=8))
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8 and labels is None and names is None
    assert images[:, 0, 0, 0].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------- tensors and sampling
def test_uint8_float_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = data.to_float(x)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(data.to_uint8(f), x)
    assert data.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clipped


def test_random_flip_is_seeded_and_fair():
    x = torch.randn(1000, 3, 4, 4)
    a = data.random_flip(x, torch.Generator().manual_seed(1))
    b = data.random_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    kept = (a == x).flatten(1).all(1)
    assert (flipped ^ kept).all()  # every image is either mirrored or untouched
    assert 400 < int(flipped.sum()) < 600  # Binomial(1000, 1/2): ±6σ
    assert not torch.equal(a, data.random_flip(x, torch.Generator().manual_seed(2)))


def _stream(sampler, k):
    return [sampler.next() for _ in range(k)]


def test_batch_sampler_epochs_and_full_batches():
    s = data.BatchSampler(10, 4, seed=0)
    batches = _stream(s, 5)  # 20 indices = exactly two epochs
    assert all(b.shape == (4,) and b.dtype == torch.int64 for b in batches)
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:])  # a fresh permutation each epoch
    assert s.state_dict()["epoch"] == 2
    big = data.BatchSampler(3, 8, seed=0).next()  # batch larger than the data: wraps over epochs, still full
    assert big.shape == (8,) and set(big.tolist()) == {0, 1, 2}


def test_batch_sampler_deterministic():
    a, b, c = (data.BatchSampler(100, 16, seed=s) for s in (7, 7, 8))
    sa, sb, sc = (torch.cat(_stream(s, 20)) for s in (a, b, c))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    assert data.BatchSampler(5, 5, seed=-1).next().sort().values.tolist() == list(range(5))  # negative seeds work


def test_batch_sampler_resume_continues_the_same_stream(tmp_path):
    full = torch.cat(_stream(data.BatchSampler(37, 8, seed=3), 30))  # crosses several epoch boundaries
    first = data.BatchSampler(37, 8, seed=3)
    head = _stream(first, 11)
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    torch.save(state, tmp_path / "s.pt")
    resumed = data.BatchSampler(37, 8, seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(torch.cat(head + _stream(resumed, 19)), full)
    with pytest.raises(UserError, match="same data"):
        data.BatchSampler(38, 8, seed=3).load_state_dict(state)


def test_batch_sampler_shards_make_up_the_global_batch():
    single = data.BatchSampler(50, 12, seed=5)
    ranks = [data.BatchSampler(50, 12, seed=5, rank=r, world_size=4) for r in range(4)]
    for _ in range(10):
        shards = [r.next() for r in ranks]
        assert all(s.shape == (3,) for s in shards)
        assert torch.equal(torch.cat(shards), single.next())
    with pytest.raises(UserError, match="multiple"):
        data.BatchSampler(50, 10, seed=0, world_size=4)
