"""An adversarial battery for fid.py and `sample.py --report --ref` (issue 17, items 4, 11b-d and 12's inputs).

Anything merely odd (a dangling symlink, a loop, a FIFO, a file name that is not UTF-8, a text file) is left out and
reported in one line, and the FID is computed from the real images. Anything wrong (a damaged statistics file, 0×0
images, statistics of another width, a flag out of range) is one `error:` line, exit code 2, before anything slow
runs and without leaving files behind. A stand-in network (tests/test_report.FakeInception) keeps it fast."""
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

import fid
import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tests.test_report import FakeInception
from tinyddpm.errors import run_cli

GOOD = 3  # good images in every test folder


@pytest.fixture
def fake(monkeypatch):
    model = FakeInception()
    monkeypatch.setattr("tinyddpm.inception.load_inception", lambda weights=None, device="cpu": model)
    return model


def run_fid(capsys, *argv):
    return run_script(fid, [*map(str, argv), "--quiet", "--num-workers", "0", "--device", "cpu"], capsys)


@pytest.fixture
def other(tmp_path):
    """The other side of every FID here: a .npy of 3 images."""
    path = tmp_path / "other.npy"
    np.save(path, np.random.default_rng(1).integers(0, 256, (GOOD, 8, 8, 3), dtype=np.uint8))
    return path


def folder(tmp_path, name="imgs"):
    return make_image_folder(str(tmp_path / name), n=GOOD, size=8)


# ---- odd folder entries: left out, said once, the FID computed ------------------------------------------------------
def _dangling(d):
    os.symlink(os.path.join(d, "gone", "x.png"), os.path.join(d, "x.png"))


def _self_loop(d):
    os.symlink("loop.png", os.path.join(d, "loop.png"))


def _folder_loop(d):
    os.symlink(".", os.path.join(d, "again"))


def _fifo(d):
    os.mkfifo(os.path.join(d, "pipe.png"))  # opening it would block forever


def _text(d):
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("not an image")


def _hidden(d):
    with open(os.path.join(d, ".partial.png.tmp.png"), "wb") as f:
        f.write(b"half a file")


@pytest.mark.parametrize("make, says", [(_dangling, "dangling symlink"), (_self_loop, "symlink loop"),
                                        (_folder_loop, "symlink loop"), (_fifo, "not a regular file"),
                                        (_text, "not an image extension"), (_hidden, "hidden")])
def test_odd_entries_are_left_out_and_reported(make, says, fake, other, tmp_path, capsys):
    d = folder(tmp_path)
    make(d)
    code, out, err = run_fid(capsys, d, other)
    assert code == 0 and out.startswith("FID: "), err
    assert "Traceback" not in err and "left out 1 entry" in err and says in err, err
    assert fake.seen == 2 * GOOD  # each good image measured once, nothing else opened


def test_non_utf8_file_names_are_read(fake, other, tmp_path, capsys):
    d = folder(tmp_path)
    try:
        Image.new("RGB", (8, 8), (9, 99, 199)).save(os.fsdecode(os.path.join(os.fsencode(d), b"caf\xe9.png")))
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    for cache in ([], ["--cache-dir", tmp_path / "cache"]):
        fake.seen = 0
        code, out, err = run_fid(capsys, d, other, *cache)
        assert code == 0 and out.startswith("FID: "), err
        assert fake.seen == 2 * GOOD + 1


def test_linked_folders_are_searched_once_and_never_outside_the_folder(fake, other, tmp_path, capsys):
    """Only the images below the folder given: a linked folder inside it counts once, and a link that leads out of
    it (`up -> ..`, whose sibling folders hold other images, or a link to another folder) is left out and said."""
    d, elsewhere = folder(tmp_path), folder(tmp_path, "elsewhere")
    make_image_folder(os.path.join(d, "sub"), n=GOOD, size=8)
    os.symlink(os.path.join(d, "sub"), os.path.join(d, "again"))  # the same folder a second time
    os.symlink("..", os.path.join(d, "up"))
    os.symlink(elsewhere, os.path.join(d, "out"))
    code, out, err = run_fid(capsys, d, other)
    assert code == 0, err
    assert fake.seen == 2 * GOOD + GOOD  # d's own images and sub's, then the other side's
    assert "left out 3 entries" in err and "2 symlink to a folder outside" in err and "second link" in err, err


def test_save_stats_never_writes_over_its_own_input(fake, tmp_path, capsys):
    arr = tmp_path / "images.npz"
    np.savez(arr, images=np.random.default_rng(2).integers(0, 256, (GOOD, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "link.npz").symlink_to(arr)
    before = arr.read_bytes()
    for target in (arr, tmp_path / "link.npz"):
        code, out, err = run_fid(capsys, arr, "--save-stats", target, "--force")
        assert_user_error(code, err, "is the input itself", "choose another name")
    assert arr.read_bytes() == before and fake.seen == 0  # refused before anything was measured


def test_unreadable_images_need_skip_bad_and_decoder_crashes_are_caught(fake, other, tmp_path, capsys,
                                                                         monkeypatch):
    d = folder(tmp_path)
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    code, out, err = run_fid(capsys, d, other)
    assert_user_error(code, err, "empty.png", "--skip-bad")
    # A crafted file can make a decoder raise anything (struct.error here): still one bad file, not a crash.
    from tinyddpm import sources

    real = sources.load_rgb
    monkeypatch.setattr(sources, "load_rgb", lambda p: (_ for _ in ()).throw(struct.error("bad")) if
                        p.endswith("img0.png") else real(p))
    code, out, err = run_fid(capsys, d, other, "--skip-bad")
    assert code == 0 and "skipped 2 unreadable" in err, err


def test_skip_bad_with_too_few_readable_images(fake, other, tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    for name in ("a.png", "b.png", "c.jpg"):
        (d / name).write_bytes(b"not an image")
    assert_user_error(*run_fid(capsys, d, other, "--skip-bad")[::2], "only 0 image")
    make_image_folder(str(d), n=1, size=8)
    assert_user_error(*run_fid(capsys, d, other, "--skip-bad")[::2], "only 1 image")


def test_fingerprint_only_with_a_cache(fake, other, tmp_path, capsys, monkeypatch):
    from tinyddpm import sources

    calls = []
    monkeypatch.setattr(sources.Source, "fingerprint", lambda self: calls.append(self.name) or "x" * 64)
    assert run_fid(capsys, folder(tmp_path), other)[0] == 0
    assert calls == []
    assert run_fid(capsys, folder(tmp_path), other, "--cache-dir", tmp_path / "c")[0] == 0
    assert len(calls) == 2


def test_one_cache_holds_features_for_kid(fake, other, tmp_path, capsys):
    d, cache = folder(tmp_path), tmp_path / "cache"
    first = run_fid(capsys, d, other, "--kid", "--kid-subsets", "3", "--cache-dir", cache)
    fake.seen = 0
    again = run_fid(capsys, d, other, "--kid", "--kid-subsets", "3", "--cache-dir", cache)
    assert first[0] == again[0] == 0 and first[1] == again[1] and fake.seen == 0, again[2]
    for entry in os.listdir(cache):  # a damaged entry is a miss: measured again, same number
        (cache / entry).write_bytes(b"damaged")
    assert run_fid(capsys, d, other, "--kid", "--kid-subsets", "3", "--cache-dir", cache)[1] == first[1]
    assert fake.seen == 2 * GOOD


def test_a_cache_that_cannot_be_written_costs_no_result(fake, other, tmp_path, capsys):
    (tmp_path / "cache").write_text("a file, not a folder")
    code, out, err = run_fid(capsys, folder(tmp_path), other, "--cache-dir", tmp_path / "cache")
    assert code == 0 and out.startswith("FID: ") and "not cached" in err, err
    assert (tmp_path / "cache").read_text() == "a file, not a folder"


# ---- statistics files and arrays: one line each --------------------------------------------------------------------
D = 12  # FakeInception's width
EYE = np.eye(D)


@pytest.mark.parametrize("content, says", [
    (dict(mu=np.zeros(D), sigma=EYE.astype(complex)), "real floating point"),
    (dict(mu=np.zeros(D, int), sigma=EYE), "real floating point"),
    (dict(mu=np.array(["a"] * D), sigma=EYE), "real floating point"),
    (dict(mu=np.zeros(D), sigma=EYE.astype(bool)), "real floating point"),
    (dict(mu=np.full(D, np.nan), sigma=EYE), "NaN/inf"),
    (dict(mu=np.zeros(D), sigma=np.where(EYE > 0, np.inf, 0.0)), "NaN/inf"),
    (dict(mu=np.zeros(0), sigma=np.zeros((0, 0))), "0 features"),
    (dict(mu=np.zeros(D), sigma=np.zeros((D, D + 1))), "not a mean"),
    (dict(mu=np.zeros((D, 1)), sigma=EYE), "not a mean"),
    (dict(mu=np.float64(0), sigma=np.float64(1)), "not a mean"),
    (dict(mu=np.zeros(D), sigma=np.zeros((D, D, 1))), "not a mean"),
    (dict(mu=np.zeros(D), sigma=EYE + np.triu(np.ones((D, D)), 1)), "not a covariance"),
    (dict(mu=np.zeros(D), sigma=-EYE), "not a covariance"),
    (dict(mu=np.zeros(D + 1), sigma=np.eye(D + 1)), f"{D + 1} features"),
    (dict(), "has keys []"),
])
def test_bad_statistics_files(content, says, fake, other, tmp_path, capsys):
    path = tmp_path / "stats.npz"
    np.savez(path, **content)
    code, out, err = run_fid(capsys, path, other)
    assert_user_error(code, err, says)
    assert fake.seen <= 1  # at most the one blank image that asks the network its width: no input measured


def test_zero_dimension_statistics_on_both_sides(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", mu=np.zeros(0), sigma=np.zeros((0, 0)))
    code, out, err = run_fid(capsys, tmp_path / "a.npz", tmp_path / "a.npz")
    assert_user_error(code, err, "0 features")


def test_statistics_of_two_widths_and_float16_files(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "b.npz", mu=np.zeros(5), sigma=np.eye(5))
    assert_user_error(*run_fid(capsys, tmp_path / "a.npz", tmp_path / "b.npz")[::2], "5 features")
    np.savez(tmp_path / "h.npz", mu=np.ones(4, np.float16), sigma=np.eye(4, dtype=np.float16))
    code, out, err = run_fid(capsys, tmp_path / "a.npz", tmp_path / "h.npz")
    assert code == 0 and float(out.split()[1]) == pytest.approx(4.0), err  # |μ1 − μ2|² = 4, same Σ


@pytest.mark.parametrize("array, says", [
    (np.zeros((4, 0, 0, 3), np.uint8), "0×0"),
    (np.zeros((4, 8, 0, 3), np.uint8), "8×0"),
    (np.zeros((0, 8, 8, 3), np.uint8), "holds 0 image"),
    (np.zeros((1, 8, 8, 3), np.uint8), "holds 1 image"),
    (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((4, 8, 8, 3), bool), "uint8"),
    (np.zeros((2, 4, 8, 8, 3), np.uint8), "shape"),
    (np.zeros((4, 8, 8, 5), np.uint8), "shape"),
])
def test_bad_image_arrays(array, says, fake, other, tmp_path, capsys):
    np.save(tmp_path / "a.npy", array)
    assert_user_error(*run_fid(capsys, tmp_path / "a.npy", other)[::2], says)
    assert fake.seen == 0


def test_inputs_that_are_links_or_not_files(fake, other, tmp_path, capsys):
    os.symlink(tmp_path / "gone.npz", tmp_path / "dangling.npz")
    assert_user_error(*run_fid(capsys, tmp_path / "dangling.npz", other)[::2], "does not exist")
    os.mkfifo(tmp_path / "pipe.npz")  # np.load would wait for a writer forever
    assert_user_error(*run_fid(capsys, tmp_path / "pipe.npz", other)[::2], "not a regular file")
    os.symlink(folder(tmp_path), tmp_path / "linked")  # a link to a folder is that folder
    assert run_fid(capsys, tmp_path / "linked", other)[0] == 0 and fake.seen == 2 * GOOD


def test_unreadable_array_files(fake, other, tmp_path, capsys):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 8, 8, 3), np.uint8), b=np.zeros((3, 8, 8, 3), np.uint8))
    for name, says in (("empty.npy", "cannot read"), ("objects.npy", "cannot read"), ("two.npz", "one uint8")):
        assert_user_error(*run_fid(capsys, tmp_path / name, other)[::2], says)


# ---- dataset references and flags ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["cifar10::test", "cifar10: :test", "cifar10:,:train:5"])
def test_dataset_reference_without_classes_is_refused(spec, other, tmp_path, capsys):
    code, out, err = run_fid(capsys, spec, other, "--data-dir", tmp_path / "nodata")
    assert_user_error(code, err, "names no class", "cifar10:all")
    assert not (tmp_path / "nodata").exists()  # refused before any download


@pytest.mark.parametrize("flags, says", [
    (["--kid", "--kid-subset-size", "1"], "at least 2"),
    (["--kid", "--kid-subsets", "0"], "at least 1"),
    (["--batch-size", "-5"], "at least 1"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--num-workers", str(10**6)], "--num-workers"),
    (["--num-workers", "-1"], "--num-workers"),
])
def test_flag_values_out_of_range(flags, says, fake, other, capsys):
    code, out, err = run_script(fid, [str(other), str(other), *flags], capsys)
    assert_user_error(code, err, says)
    assert fake.seen == 0


def test_huge_batch_and_subset_sizes_are_capped(fake, other, tmp_path, capsys):
    code, out, err = run_fid(capsys, folder(tmp_path), other, "--batch-size", 10**12, "--kid",
                             "--kid-subset-size", 10**12, "--kid-subsets", "2")
    assert code == 0 and out.count("ID: ") == 2, err


def test_out_of_memory_is_one_line(other, capsys, monkeypatch):
    class Hungry(FakeInception):
        def forward(self, x):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10995116277760 "
                               "bytes")

    monkeypatch.setattr("tinyddpm.inception.load_inception", lambda weights=None, device="cpu": Hungry())
    assert_user_error(*run_fid(capsys, other, other, "--batch-size", 10**6)[::2], "smaller --batch-size")


# ---- sample.py --report --ref ------------------------------------------------------------------------------------------
N = 4


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory):
    """A folder model trained for one step: its report needs --ref."""
    root = tmp_path_factory.mktemp("hardening")
    data = make_image_folder(str(root / "data"), n=N, size=8)
    assert run_cli(train.main, ["--out", str(root / "run"), "--steps", "1", "--dataset", "folder", "--data-dir", data,
                                "--image-size", "8", *MICRO_FLAGS, "--sample-every", "1000",
                                "--save-every", "1000"]) == 0
    return str(root / "run" / "ckpt.pt")


def _report(ckpt, tmp_path, ref, *extra):
    return ["--ckpt", ckpt, "--report", "--n", str(N), "--steps", "2", "--device", "cpu", "--ref", str(ref),
            "--out", str(tmp_path / "rep"), "--cache-dir", str(tmp_path / "cache"), *extra]


def test_report_ref_folder_with_odd_entries(folder_model, fake, tmp_path, capsys):
    d = make_image_folder(str(tmp_path / "ref"), n=N, size=8)
    _dangling(d), _self_loop(d), _fifo(d)
    try:
        Image.new("RGB", (8, 8)).save(os.fsdecode(os.path.join(os.fsencode(d), b"\xff.png")))
    except (OSError, UnicodeError):
        pass
    code, out, err = run_script(sample, _report(folder_model, tmp_path, d), capsys)
    assert code == 0 and "left out 3 entries" in err and "Traceback" not in err, err
    with open(tmp_path / "rep" / "report.json") as f:
        assert json.load(f)["results"][0]["fid"] > 0


def test_report_ref_folder_with_a_non_utf8_name(folder_model, fake, tmp_path, capfd):
    """capfd, not capsys: the real sys.stderr writes undecodable bytes as escapes, as a terminal gets them."""
    try:
        d = make_image_folder(os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"r\xe9f")), n=N, size=8)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    code, out, err = run_script(sample, _report(folder_model, tmp_path, d), capfd)
    assert code == 0 and "r\\udce9f" in out, err
    assert "r\\udce9f" in (tmp_path / "rep" / "report.md").read_text()


def test_report_advises_its_own_skip_bad(folder_model, fake, tmp_path, capsys):
    d = make_image_folder(str(tmp_path / "ref"), n=N + 1, size=8)
    (tmp_path / "ref" / "broken.png").write_bytes(b"not a png")
    code, out, err = run_script(sample, _report(folder_model, tmp_path, d), capsys)
    assert_user_error(code, err, "broken.png", "--skip-bad")
    assert not (tmp_path / "rep").exists()  # stopped before the output folder was made
    code, out, err = run_script(sample, _report(folder_model, tmp_path, d, "--skip-bad"), capsys)
    assert code == 0 and "skipped 1 unreadable" in err, err


def test_report_refuses_statistics_of_another_width_before_generating(folder_model, fake, tmp_path, capsys,
                                                                      monkeypatch):
    from tinyddpm.generate import LoadedModel

    monkeypatch.setattr(LoadedModel, "images", lambda *a, **k: pytest.fail("generated before the check"))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    code, out, err = run_script(sample, _report(folder_model, tmp_path, tmp_path / "ref.npz"), capsys)
    assert_user_error(code, err, "2048 features", "12")
    assert not (tmp_path / "rep").exists()  # nothing left behind


def test_report_against_a_statistics_file(folder_model, fake, tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", mu=np.full(D, 0.5), sigma=np.eye(D) * 0.01)
    code, out, err = run_script(sample, _report(folder_model, tmp_path, tmp_path / "ref.npz"), capsys)
    assert code == 0, err
    with open(tmp_path / "rep" / "report.json") as f:
        (row,) = json.load(f)["results"]
    assert row["fid"] > 0 and row["kid"] is None and row["precision"] is None and row["memorisation"] is None
