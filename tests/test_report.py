"""The quality report (`sample.py --report`, tinyddpm/report.py) and dataset references (`cifar10:cat:test`).

Most tests swap the Inception for a small stand-in (`FakeInception`: 12 colour features, counts what it sees) so the
plumbing — rows, splits, cache, JSON, errors — runs in seconds; one test uses the real FID weights and checks the
report's numbers against fid.py's."""
import json
import warnings

import numpy as np
import pytest
import torch

import fid
import sample
import train
from tests.helpers import MICRO_FLAGS, assert_user_error, make_image_folder, run_script
from tinyddpm import data as data_mod
from tinyddpm import distance
from tinyddpm import report, sources
from tinyddpm.errors import run_cli
from tinyddpm.generate import CLASS_AUTOGUIDANCE, DEFAULT_AUTOGUIDANCE, DEFAULT_N
from tinyddpm.samplers import DDIM, DEFAULT_SAMPLER, DEFAULT_STEPS

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load:DeprecationWarning")

N = 4
REF8 = "cifar10:cat:test:8"  # a small reference keeps the real-Inception test fast


class FakeInception(torch.nn.Module):
    """[B, 3, H, W] in [0, 1] → 12 features (mean and spread of each channel in two halves); counts its images."""
    weights_id, weights_path, weights_how, flavour = "fake-inception-1", "fake", "a test stand-in", "fid"

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        self.largest = max(getattr(self, "largest", 0), len(x))
        top, bottom = x[..., : x.shape[-2] // 2, :], x[..., x.shape[-2] // 2:, :]
        parts = [p.mean(dim=(2, 3)) for p in (top, bottom)] + [p.std(dim=(2, 3)) for p in (top, bottom)]
        return torch.cat(parts, dim=1)


@pytest.fixture
def fake(monkeypatch):
    model = FakeInception()
    monkeypatch.setattr("tinyddpm.inception.load_inception", lambda weights=None, device="cpu": model)
    return model


GAN_MICRO = ["--batch-size", "4", "--grid-size", "4", "--device", "cpu", "--g-channels", "8", "--d-channels", "8"]


def _train(out, flags, micro=MICRO_FLAGS):
    assert run_cli(train.main, ["--out", str(out), "--steps", "1", *flags, *micro,
                                "--sample-every", "1000", "--save-every", "1000"]) == 0
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, cifar_root):
    """1-step micro models: unconditional cats, class-conditional cat+frog, a DCGAN on cats, a folder model."""
    root = tmp_path_factory.mktemp("report")
    cifar = ["--dataset", "cifar", "--data-dir", cifar_root, "--image-size", "32"]
    folder = make_image_folder(str(root / "imgs"), n=4, size=16)
    return dict(
        cat=_train(root / "cat", [*cifar, "--class", "cat"]),
        cond=_train(root / "cond", [*cifar, "--class", "cat", "frog", "--conditional"]),
        gan=_train(root / "gan", [*cifar, "--class", "cat", "--model", "dcgan"], GAN_MICRO),
        folder=_train(root / "folder", ["--dataset", "folder", "--data-dir", folder, "--image-size", "16"]),
        folder_data=folder)


def _report(ckpt, tmp_path, *extra, out="rep"):
    return ["--ckpt", ckpt, "--report", "--n", str(N), "--steps", "2", "--device", "cpu",
            "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"), *extra]


def _json(tmp_path, out="rep"):
    with open(tmp_path / out / "report.json") as f:
        return json.load(f)


def test_report_fields_floor_splits_and_cache(ckpts, fake, cifar_root, tmp_path, capsys):
    code, out, err = run_script(sample, _report(ckpts["cat"], tmp_path, "--ref", "cifar10:cat:test:8",
                                                "--data-dir", cifar_root), capsys)
    assert code == 0, err
    r = _json(tmp_path)
    assert {"ckpt", "model", "step", "n", "sampler", "steps", "cfg_scale", "inception", "wall_seconds",
            "results"} <= set(r)
    assert (r["model"], r["step"], r["n"], r["sampler"], r["steps"]) == ("ddpm", 1, N, DEFAULT_SAMPLER, 2)
    (row,) = r["results"]
    assert row["reference"] == "cifar10:cat:test:8" and row["floor_reference"] == f"cifar10:cat:train:{N}"
    assert row["fid"] > 0 and row["floor"] > 0 and row["ratio"] == pytest.approx(row["fid"] / row["floor"])
    assert len(row["kid"]) == 2 and len(row["floor_kid"]) == 2
    cats_train = 5000  # the memorisation check searches every train cat; the floor is the first N of them
    assert fake.seen == 8 + cats_train + N  # reference, train split, generated
    # The floor is N *train* cats against the *test* cats: recompute it from the split files themselves.
    test, test_y = data_mod.load_cifar10(cifar_root, "test", ["cat"])
    train_, train_y = data_mod.load_cifar10(cifar_root, "train", ["cat"])
    assert (test_y == 3).all() and (train_y == 3).all()
    ref, floor = test[:8], train_[:N]
    assert not any((f == t).all() for f in floor for t in ref)  # never the same image on both sides
    feats = lambda u8: fake(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255).numpy()  # noqa: E731
    from tinyddpm.distance import frechet_distance
    from tinyddpm.statistics import statistics_from_features

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small-N warning
        want = frechet_distance(*statistics_from_features(feats(floor)), *statistics_from_features(feats(ref)))
    assert row["floor"] == pytest.approx(want, rel=1e-9)
    md = (tmp_path / "rep" / "report.md").read_text()
    # The tiny preset keeps an autoguidance snapshot (here after the run's only step), so the default uses it.
    how = f"| {DEFAULT_SAMPLER} 2, autoguidance {DEFAULT_AUTOGUIDANCE:g} (step 1) |"
    assert md.count("\n") == 3 and how in md and "cifar10:cat:test:8" in md and "|" in out
    images = np.load(tmp_path / "rep" / "report_images.npy")
    assert images.shape == (N, 32, 32, 3) and images.dtype == np.uint8
    assert (tmp_path / "rep" / "report_grid.png").is_file()

    # Second call: reference and floor features come from the cache; only the generated images are measured.
    fake.seen = 0
    code, out, err = run_script(sample, _report(ckpts["cat"], tmp_path, "--ref", "cifar10:cat:test:8",
                                                "--data-dir", cifar_root, out="rep2"), capsys)
    assert code == 0, err
    assert fake.seen == N and err.count("features from cache") == 2
    assert _json(tmp_path, "rep2")["results"][0]["fid"] == pytest.approx(row["fid"], rel=1e-12)
    # Same seeds, same images: the report is reproducible.
    assert (np.load(tmp_path / "rep2" / "report_images.npy") == images).all()


def test_class_model_gives_one_row_per_class(ckpts, fake, cifar_root, tmp_path, capsys, monkeypatch):
    # Each class's default reference is its 1,000 test images: shrink them to 8 to keep the test fast.
    load = data_mod.load_cifar10

    def small(root, split="train", classes=(), **kw):
        images, labels = load(root, split, classes, **kw)
        return images[:8 if split == "test" else 16], labels[:8 if split == "test" else 16]

    monkeypatch.setattr(data_mod, "load_cifar10", small)
    from tinyddpm.generate import LoadedModel

    conds, images = [], LoadedModel.images

    def spy(self, cond, options, callback=None):
        conds.append((list(options.seeds()), cond.tolist(), options.guidance_scale))
        return images(self, cond, options, callback)

    monkeypatch.setattr(LoadedModel, "images", spy)
    code, out, err = run_script(sample, _report(ckpts["cond"], tmp_path, "--data-dir", cifar_root,
                                                "--cfg-scale", "2", "--eta", "1"), capsys)
    assert code == 0, err
    r = _json(tmp_path)
    assert r["cfg_scale"] == 2.0 and r["eta"] == 1.0
    assert [(x["condition"], x["reference"], x["floor_reference"]) for x in r["results"]] == [
        ("cat", "cifar10:cat:test", f"cifar10:cat:train:{N}"), ("frog", "cifar10:frog:test", f"cifar10:frog:train:{N}")]
    assert (tmp_path / "rep" / "report_images_cat.npy").is_file() and (tmp_path / "rep" / "report_grid_frog.png").is_file()
    # a conditional tiny run keeps its snapshot too (GUIDE_AT), so both guidances are named
    assert f"| ddim 2, η = 1, autoguidance {CLASS_AUTOGUIDANCE:g} (step 1), w = 2 |" in out and out.count("| cifar10:") == 2
    # Each row asks the model for its own class (index in the checkpoint's class list), from the same seeds.
    seeds = list(range(N))
    assert conds == [(seeds, [0] * N, 2.0), (seeds, [1] * N, 2.0)]


def test_gan_and_folder_models(ckpts, fake, cifar_root, tmp_path, capsys):
    code, out, err = run_script(sample, ["--ckpt", ckpts["gan"], "--report", "--n", str(N), "--device", "cpu",
                                         "--out", str(tmp_path / "g"), "--cache-dir", str(tmp_path / "c"),
                                         "--ref", REF8, "--data-dir", cifar_root], capsys)
    assert code == 0, err
    r = _json(tmp_path, "g")
    assert r["model"] == "dcgan" and r["sampler"] is None and "| dcgan |" in out
    # A folder model has no dataset split: it is compared with the folder given, without a floor.
    code, out, err = run_script(sample, _report(ckpts["folder"], tmp_path, "--ref", ckpts["folder_data"],
                                                out="f"), capsys)
    assert code == 0, err
    (row,) = _json(tmp_path, "f")["results"]
    assert row["floor"] is None and row["ratio"] is None and row["fid"] > 0


def test_report_features_use_the_cpu_feature_batch(ckpts, fake, cifar_root, tmp_path, capsys):
    """--batch-size is the sampling batch; the Inception runs at statistics.CPU_FEATURE_BATCH on a CPU (faster)."""
    from tinyddpm.statistics import CPU_FEATURE_BATCH

    n = 2 * CPU_FEATURE_BATCH + 1
    code, out, err = run_script(sample, ["--ckpt", ckpts["gan"], "--report", "--n", str(n), "--batch-size", str(n),
                                         "--device", "cpu", "--out", str(tmp_path / "g"), "--data-dir", cifar_root,
                                         "--cache-dir", str(tmp_path / "c"), "--ref", f"cifar10:cat:test:{n}"], capsys)
    assert code == 0, err
    assert fake.largest == CPU_FEATURE_BATCH and _json(tmp_path, "g")["results"][0]["fid"] > 0


@pytest.mark.parametrize("which, extra, says", [
    ("cat", ["--ref", "cifar10:frog:test"], "other classes"),
    ("cat", ["--ref", "cifar10:cat:train"], "train split"),
    ("cat", ["--ref", "cifar10:cat:test:8", "--n", "9"], "--n 9 is more than the 8"),
    ("cat", ["--ref", "cifar10:kitten:test"], "unknown cifar-10 class"),
    ("cat", ["--ref", "cifar10:cat:val"], "unknown cifar-10 split"),
    ("cat", ["--ref", "cifar10:cat:test:many"], "positive integer"),
    ("cat", ["--n", "1"], "at least 2"),
    ("cat", ["--train-images", "-1"], "--train-images"),
    ("cat", ["--train-images", "99999"], "at most 5000"),
    ("cat", ["--ref", "cifar10::test"], "names no class"),
    ("cat", ["--class", "cat"], "unconditional"),
    ("cat", ["--cfg-scale", "2"], "conditional"),
    ("cond", ["--class", "dog"], "not trained"),
    ("cond", ["--ref", REF8], "one --class"),
    ("cond", ["--labels", "red cube"], "--labels"),
    ("folder", [], "no built-in reference"),
    ("folder", ["--ref", "cifar10:cat:test"], "not cifar-10"),
    ("cat", ["--fuse", "a.png", "b.png"], "one at a time"),
    ("cat", ["--bpd"], "one at a time"),
])
def test_bad_report_requests(which, extra, says, ckpts, fake, cifar_root, tmp_path, capsys):
    argv = _report(ckpts[which], tmp_path, "--data-dir", cifar_root, *extra)
    code, out, err = run_script(sample, argv, capsys)
    assert_user_error(code, err, says)
    assert fake.seen == 0 and not (tmp_path / "rep" / "report.json").exists()


def test_report_flags_need_report(ckpts, tmp_path, capsys):
    code, out, err = run_script(sample, ["--ckpt", ckpts["cat"], "--ref", REF8, "--out", str(tmp_path / "s")],
                                capsys)
    assert_user_error(code, err, "--ref", "--report")


def test_report_equals_fid_py_with_the_real_inception(ckpts, cifar_root, tmp_path, capsys):
    """The report's FID and floor are fid.py's numbers for the same images and references."""
    code, out, err = run_script(sample, _report(ckpts["cat"], tmp_path, "--ref", REF8, "--data-dir", cifar_root,
                                                "--steps", "3", "--train-images", "8"), capsys)
    assert code == 0, err
    (row,) = _json(tmp_path)["results"]
    cli = lambda *a: run_script(fid, [*a, "--data-dir", cifar_root, "--device", "cpu", "--quiet"], capsys)  # noqa
    code, out, err = cli(str(tmp_path / "rep" / "report_images.npy"), REF8)
    assert code == 0, err
    assert float(out.split()[1]) == pytest.approx(row["fid"], rel=1e-5)
    code, out, err = cli(f"cifar10:cat:train:{N}", REF8)
    assert code == 0, err
    assert float(out.split()[1]) == pytest.approx(row["floor"], rel=1e-5)
    assert row["floor"] < row["fid"]  # real cats are closer to real cats than a 1-step model's noise is


def test_kid_cell_gives_a_spread_only_when_there_are_subsets():
    """At N = 1,000 (the subset size) every subset is the whole set: one KID value, shown without a '± 0.00' that
    would read as no uncertainty; with fewer images per subset than N the cell is mean ± std over the subsets."""
    real = np.random.default_rng(0).normal(size=(40, 6))
    fake = np.random.default_rng(1).normal(0.3, 1.0, size=(40, 6))
    whole = distance.kernel_inception_distance(fake, real, subsets=5, subset_size=40)
    some = distance.kernel_inception_distance(fake, real, subsets=5, subset_size=20)
    assert whole[1] == 0 and some[1] > 0
    result = dict(condition=None, reference="cifar10:cat:test", fid=81.6, floor=48.0, ratio=1.70, kid=whole,
                  floor_kid=(0.0, 0.0), precision=None, floor_precision=None, recall=None, floor_recall=None,
                  memorisation=None, seconds=1.0)
    summary = dict(model="ddpm", sampler="dpmpp-2m-sde", steps=50, eta=0.0, cfg_scale=None, ckpt="ckpt.pt",
                   step=1, n=40, results=[result])
    kid_column = 10  # 1-based in the table's header; cell 0 is the empty text before the first '|'
    assert report.markdown(summary).splitlines()[0].split("|")[kid_column].strip() == "KID ×1e3"

    def kid_cell():
        return report.markdown(summary).splitlines()[2].split("|")[kid_column].strip()

    assert kid_cell() == f"{whole[0] * report.KID_SCALE:.2f}"
    result["kid"] = some
    assert kid_cell() == f"{some[0] * report.KID_SCALE:.2f} ± {some[1] * report.KID_SCALE:.2f}"


def test_dataset_reference_parsing():
    ref = sources.parse_cifar_reference("CIFAR10: Cat ,frog:Train:12")
    assert (ref.classes, ref.split, ref.count) == ((3, 6), "train", 12)
    assert ref.spec == "cifar10:cat,frog:train:12"
    assert sources.parse_cifar_reference("cifar10:all:test").spec == "cifar10:all:test"
    assert sources.parse_cifar_reference("cifar10:3:test").classes == (3,)
    for bad in ("cifar10:cat", "cifar10:cat:test:0", "cifar10:cat:test:2:3"):
        with pytest.raises(Exception) as e:
            sources.parse_cifar_reference(bad)
        assert e.type.__name__ == "UserError"


def test_fid_py_reads_dataset_references(cifar_root, tmp_path, capsys, fake):
    out_npz = tmp_path / "cats.npz"
    code, out, err = run_script(fid, ["cifar10:cat:test:5", "--save-stats", str(out_npz), "--data-dir", cifar_root],
                                capsys)
    assert code == 0, err
    assert fake.seen == 5
    code, out, err = run_script(fid, ["cifar10:cat:test:5", "cifar10:dog:train:99999", "--data-dir", cifar_root],
                                capsys)
    assert_user_error(code, err, "only 5000")


@pytest.fixture(scope="module")
def seeded_ckpt(tmp_path_factory):
    """An unconditional checkpoint with an autoguidance snapshot, made from seeds (tests/same_images.py)."""
    from tests.same_images import fixed_checkpoint

    return fixed_checkpoint(str(tmp_path_factory.mktemp("seeded") / "ckpt.pt"))


def _resolved_options(ckpt, mode, extra, tmp_path, capsys, monkeypatch):
    """The SamplingOptions sample.py resolves for `mode` and the flags `extra`, caught at its check (which then
    stops the run before anything is made): (options or None, exit code, stderr)."""
    from tinyddpm.errors import UserError
    from tinyddpm.generate import SamplingOptions

    seen = []

    def stop(self, loaded):
        seen.append(self)
        raise UserError("stopped by the test")

    monkeypatch.setattr(SamplingOptions, "check", stop)
    modes = {None: [], "--report": ["--report"], "--fuse": ["--fuse", "a.png", "b.png"],
             "--interpolate": ["--interpolate", "a.png", "b.png"]}
    code, _, err = run_script(sample, ["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--device", "cpu",
                                       *modes[mode], *extra], capsys)
    return (seen[-1] if seen else None), code, err


@pytest.mark.parametrize("mode, sampler, steps, autoguidance, n", [
    (None, DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_AUTOGUIDANCE, DEFAULT_N),
    ("--report", DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_AUTOGUIDANCE, report.REPORT_N),
    ("--fuse", DDIM.name, DDIM.steps, 1.0, 1), ("--interpolate", DDIM.name, DDIM.steps, 1.0, 1)])
def test_default_sampler_per_mode(mode, sampler, steps, autoguidance, n, seeded_ckpt, tmp_path, capsys,
                                  monkeypatch):
    """Images and the report default to the sampler the FID-vs-calls table chose (docs/samplers.md) and, with a
    checkpoint that has a snapshot, to autoguidance; fusion and interpolation keep deterministic, plain DDIM
    (interpolation must invert exactly). Flags still override."""
    def resolved(*extra):
        opts, code, err = _resolved_options(seeded_ckpt, mode, extra, tmp_path, capsys, monkeypatch)
        assert opts is not None and code == 2 and "stopped by the test" in err, err
        return opts

    opts = resolved()
    assert (opts.sampler.name, opts.sampler.calls(), opts.sampler.eta, opts.autoguidance, opts.n) == \
        (sampler, steps, 0.0, autoguidance, n)
    assert opts.sampler.clip_x0 and opts.guidance_scale == 1.0 and opts.seed == 0
    assert resolved("--autoguidance", "1.5").autoguidance == 1.5
    opts = resolved("--sampler", "ddim", "--steps", "7")
    assert (opts.sampler.name, opts.sampler.steps) == ("ddim", 7)
    if mode == "--interpolate":  # η is refused there: the round trip needs deterministic DDIM
        monkeypatch.undo()  # the real check, and the refusal after it
        code, _, err = run_script(sample, ["--ckpt", seeded_ckpt, "--out", str(tmp_path / "o"), "--device", "cpu",
                                           "--interpolate", "a.png", "b.png", "--eta", "1"], capsys)
        assert_user_error(code, err, "deterministic", "--eta")
    else:  # η is DDIM's: it implies ddim
        opts = resolved("--eta", "1")
        assert (opts.sampler.name, opts.sampler.eta) == ("ddim", 1.0)
