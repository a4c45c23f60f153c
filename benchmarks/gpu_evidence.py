"""GPU evidence in one command: the repository's own benchmarks and scripts on an offline GPU, every figure in one
JSON and one Markdown file in --out, sized to a 15-minute GPU window (docs/gpu.md: what each step measures).

    python benchmarks/gpu_evidence.py --make-bundle                    # here, with network, once
    python3 benchmarks/gpu_evidence.py --out "$OUT"                    # on the GPU machine
    python benchmarks/gpu_evidence.py --smoke --out /tmp/evidence      # CPU, toy sizes, toy bundle

The GPU machine has torch but no network and gets only the repository (≤ 64 MiB, carried files included), so
--make-bundle writes into the git-ignored --bundle folder: cats.zip (the 5,000 train + 1,000 test CIFAR-10 cats in
the order tinyddpm's loader reads them, each the file of ../shared's JPEG export that decodes to exactly its pixels,
else a PNG, and the SHA-256 of each split's pixels), the FID Inception weights rounded to float16 (the float32 file
alone is over the limit) and wheels/ (WHEEL_PINS: what the GPU image lacks).

Steps (STEPS), each under a time cap, the last with what is left of --budget-s; a failure or timeout is recorded and
the next step runs; the JSON and Markdown are rewritten after every step. unet and fid are bench_unet.py and
bench_fid.py; loop is train.py at ddpm-cifar on the cats; sampler is sample.py's defaults on that checkpoint;
quality is train.py --preset small until the clock sends SIGTERM (train.py saves a checkpoint; the learning rate is
constant after warm-up, so this equals --steps <steps reached>), then sample.py --report.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_fid  # noqa: E402
import bench_unet  # noqa: E402
from tinyddpm.data import CIFAR10_CLASSES, CIFAR10_FOLDER, CIFAR10_SPLITS, load_cifar10  # noqa: E402
from tinyddpm.errors import UserError, run_cli  # noqa: E402
from tinyddpm.files import atomic_write_bytes  # noqa: E402

DEFAULT_BUNDLE = os.path.join(ROOT, ".carry", "gpu-evidence")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
CATS, WEIGHTS, WHEELS, CHECKSUMS = "cats.zip", "inception_fid_fp16.pth", "wheels", "sha256.json"
CLASS = "cat"
TRAIN_CATS, TEST_CATS = 5000, 1000  # all cats of each split
TRAVEL_LIMIT = 64 * 2 ** 20  # bytes: the device tool copies the working tree plus carried paths up to this
MB = 1e6
# Pinned to the versions checked against the GPU image's packages (huggingface-hub, safetensors, zipp, regex,
# requests, filelock, pillow, numpy, scipy and a torchvision matching its torch are there already; these are not).
WHEEL_PINS = ("diffusers==0.42.1", "importlib-metadata==10.2.0", "lazy-importer==0.1.0", "pytorch-fid==0.3.0")
WHEEL_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--no-deps"] + [
    a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
OUT_FILES = ("gpu_evidence.json", "gpu_evidence.md")
REPORT_PNGS = 2  # the report's sample grid and closest pairs, copied to --out (the device tool returns few files)
SIGTERM_POLL_S = 0.1  # how often the quality run's clock looks whether train.py's signal handler is in place
# Per step: the flags of the script it runs (besides data, device and folders). caps: seconds per step; the quality
# step gets the rest of budget_s, of which report_reserve_s is kept for the report.
FULL = dict(unet=["--config", "ddpm-cifar", "--sample-batch", "1000", "--repeats", "1", "--modes", "bf16",
                  "bf16-compile", "fp32"],  # what the goals compare first: a time cap loses the fp32 rows
            loop=["--preset", "ddpm-cifar", "--steps", "200", "--log-every", "50", "--grid-size", "16",
                  "--grid-steps", "10"],
            sampler=["--n", "1000", "--batch-size", "1000"], fid=["--images", "1000", "--batch-size", "250"],
            quality=["--preset", "small", "--log-every", "250", "--grid-size", "16", "--grid-steps", "10"], report=[],
            caps=dict(unet=240, loop=60, sampler=45, fid=90), report_reserve_s=60, budget_s=480)
SMOKE = dict(unet=["--config", "tiny", "--batch-size", "4", "--sample-batch", "4", "--iters", "1", "--warmup", "1",
                   "--repeats", "1"],
             loop=["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--log-every", "2", "--grid-size", "4",
                   "--grid-steps", "2"],
             sampler=["--n", "4", "--batch-size", "4", "--steps", "2"],
             fid=["--images", "2", "--batch-size", "2", "--repeats", "1", "--threads", "1", "--skip", "fd", "fid"],
             quality=["--preset", "tiny", "--steps", "6", "--log-every", "3", "--batch-size", "4"],
             report=["--n", "4", "--steps", "2", "--batch-size", "4"],
             caps=dict(unet=60, loop=60, sampler=60, fid=60), report_reserve_s=20, budget_s=240)
GOALS = (  # (goal, target, comparison, format, unit): the speed and GPU-quality issues' goals
    ("training: tinyddpm (best mode) / diffusers bf16 + compile (faster layout), img/s", 1.5, ">=", ".2f", "×"),
    ("sampling: tinyddpm (best mode) / diffusers (best mode and layout), image-steps/s", 1.5, ">=", ".2f", "×"),
    ("quality: cats FID-1k / floor after the short run", 1.15, "<=", ".2f", "×"),
    # Held-out test images are flagged 5 % of the time by construction (docs/report.md); "clean": at most twice that.
    ("memorisation: generated cats flagged as near-copies (worst of Inception / pixels)", 0.10, "<=", ".1%", ""),
)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the run's folder for gpu_evidence.json, gpu_evidence.md and two grids")
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help="the bundle's folder (default .carry/gpu-evidence)")
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, a toy bundle: checks the code paths")
    p.add_argument("--budget-s", type=float, help="seconds for the whole run (default 480; smoke 240)")
    g = p.add_argument_group("--make-bundle")
    g.add_argument("--make-bundle", action="store_true", help="write the bundle and check the 64 MiB limit")
    g.add_argument("--data-dir", default=os.path.join(ROOT, ".cache", "cifar"),
                   help="folder holding cifar-10-batches-py/ (default .cache/cifar, as tests/conftest.py builds it)")
    g.add_argument("--jpeg-zip", default=os.path.join(SHARED_DATA, "cifar10-jpeg.zip"),
                   help="the JPEG export CIFAR-10 was built from (../shared); cats travel as these files")
    g.add_argument("--weights", help="FID Inception weights (default: found as fid.py finds them)")
    g.add_argument("--no-wheels", action="store_true", help="no pip download (diffusers and pytorch-fid are left out)")
    return p


# ------------------------------------------------------------------------------------------------- the bundle
def pixels_sha256(images):
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def decode(data):  # as ../shared/data/make_cifar10.py decodes them (PIL, RGB)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def encode(img, fmt):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def pack_cats(path, splits, jpegs):
    """cats.zip from splits {name: uint8 [N, H, W, 3]}: image i of a split is the file of jpegs[name] (any order)
    that decodes to exactly it, else a PNG. Returns {"jpeg": count, "png": count}."""
    counts = {"jpeg": 0, "png": 0}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # JPEG and PNG files are compressed already
        for name, images in splits.items():
            by_pixels = {decode(data).tobytes(): data for data in jpegs.get(name, ())}
            for i, img in enumerate(images):
                data = by_pixels.get(np.ascontiguousarray(img).tobytes())
                ext = "jpeg" if data else "png"
                counts[ext] += 1
                z.writestr(f"{name}/{i:05d}.{ext}", data or encode(img, "PNG"))
        z.writestr(CHECKSUMS, json.dumps({name: pixels_sha256(images) for name, images in splits.items()}))
    atomic_write_bytes(path, buf.getvalue())
    return counts


def unpack_cats(path):
    """cats.zip → ({split: uint8 [N, H, W, 3]}, {split: the pixels are the packed ones (SHA-256)})."""
    with zipfile.ZipFile(path) as z:
        checksums = json.loads(z.read(CHECKSUMS))
        names = sorted(n for n in z.namelist() if n != CHECKSUMS)
        splits = {s: np.stack([decode(z.read(n)) for n in names if n.startswith(s + "/")]) for s in checksums}
    return splits, {s: pixels_sha256(images) == checksums[s] for s, images in splits.items()}


def write_cifar_layout(root, train, test, class_name=CLASS):
    """root/cifar-10-batches-py/ holding only these images (uint8 [N, 32, 32, 3]), all labelled `class_name`, with
    the official file names and keys (protocol-4 pickles, which need no _codecs global), so that
    tinyddpm.data.load_cifar10(root, split, [class_name]) returns them in this order."""
    os.makedirs(os.path.join(root, CIFAR10_FOLDER), exist_ok=True)
    parts = dict(zip(CIFAR10_SPLITS["train"], np.array_split(train, len(CIFAR10_SPLITS["train"]))), test_batch=test)
    for name, images in parts.items():  # R, G, B planes, each row by row (a batch may be empty)
        rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), np.prod(images.shape[1:]))
        with open(os.path.join(root, CIFAR10_FOLDER, name), "wb") as f:
            pickle.dump({"data": rows, "labels": [CIFAR10_CLASSES.index(class_name)] * len(images)}, f, protocol=4)
    return root


def make_cats(out, data_dir, jpeg_zip):
    """cats.zip from CIFAR-10 in data_dir; returns how many cats travel as JPEG and as PNG files."""
    splits = {s: load_cifar10(data_dir, s, [CLASS], download=False)[0] for s in ("train", "test")}
    for s, n in (("train", TRAIN_CATS), ("test", TEST_CATS)):
        if len(splits[s]) != n:
            raise UserError(f"{data_dir} has {len(splits[s])} {s} cats, expected {n}; pass a complete CIFAR-10")
    jpegs = {}
    if os.path.isfile(jpeg_zip):
        with zipfile.ZipFile(jpeg_zip) as z:
            jpegs = {s: [z.read(n) for n in z.namelist() if n.startswith(f"{s}/{CLASS}/") and n.endswith(".jpg")]
                     for s in splits}
    return pack_cats(os.path.join(out, CATS), splits, jpegs)


def make_weights(out, weights=None):
    """The FID Inception weights (found as fid.py finds them) as a float16 torchvision-layout file in `out`."""
    from tinyddpm.files import atomic_torch_save
    from tinyddpm.inception import find_weights, read_weights

    path, how = find_weights(weights, download=False)
    state, flavour = read_weights(path)
    if flavour != "fid":
        raise UserError(f"{path} is the {flavour} Inception; the bundle needs the FID weights (docs/fid.md)")
    atomic_torch_save({k: v.half() if v.is_floating_point() else v for k, v in state.items()
                       if not k.endswith("num_batches_tracked")}, os.path.join(out, WEIGHTS))
    return f"{path} ({how}), float16"


def install_wheels(folder, site):
    """On the GPU machine: pip install the bundle's wheels into `site` (no network, no dependency resolution), and
    put `site` on sys.path and PYTHONPATH (for pytorch-fid's subprocess). Returns what happened, in words."""
    wheels = sorted(os.path.join(folder, w) for w in os.listdir(folder) if w.endswith(".whl")) \
        if os.path.isdir(folder) else []
    if not wheels:
        return "no wheels in the bundle"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", "--target", site, *wheels], capture_output=True, text=True)
    if done.returncode:
        return f"pip install failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (site, os.environ.get("PYTHONPATH"))))
    importlib.invalidate_caches()
    return f"installed {', '.join(os.path.basename(w) for w in wheels)}"


def make_toy_bundle(folder, n_train=4, n_test=4):
    """--smoke: smooth random 'cats' (4×4 colour blocks) packed from their own JPEG files as the real ones, and the
    FID weights found here rounded to float16. Returns which weights."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (n_train + n_test, 4, 4, 3), dtype=np.uint8).repeat(8, axis=1).repeat(8, axis=2)
    files = [encode(img, "JPEG") for img in blocks]
    images = np.stack([decode(f) for f in files])
    pack_cats(os.path.join(folder, CATS), dict(train=images[:n_train], test=images[n_train:]),
              dict(train=files[:n_train], test=files[n_train:]))
    return make_weights(folder)


def check_size(bundle, root=ROOT, limit=TRAVEL_LIMIT):
    """(repository bytes, bundle bytes), counted as the device tool copies them (the repository: tracked and
    untracked, not ignored, files); UserError when together over the limit."""
    listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    repo = sum(os.path.getsize(p) for p in (os.path.join(root, f) for f in listed if f) if os.path.isfile(p))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(bundle) for f in names)
    print(f"travels: repository {repo / MB:.1f} MB + bundle {size / MB:.1f} MB of {limit / MB:.1f} MB")
    if repo + size > limit:
        raise UserError(f"repository + bundle is {(repo + size) / MB:.1f} MB, over the {limit / MB:.1f} MB the GPU "
                        "machine receives; drop the wheels, or remove large untracked files from the repository")
    return repo, size


# ---------------------------------------------------------------------------------------------------- the run
class StepTimeout(BaseException):
    """A step's time is up (BaseException, so that no `except Exception` inside a script swallows it)."""


class Evidence:
    """The run's sizes, device, folders and result; `save()` rewrites the JSON and Markdown atomically."""

    def __init__(self, args, sizes, work):
        self.args, self.sizes, self.work, self.t0 = args, sizes, work, time.perf_counter()
        self.device, self.data_dir = "cpu" if args.smoke else "cuda", os.path.join(work, "data")
        budget = args.budget_s or sizes["budget_s"]
        self.deadline = self.step_end = self.t0 + budget
        self.result = dict(smoke=args.smoke, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           budget_s=budget, steps={})

    def say(self, msg):
        print(f"[{time.perf_counter() - self.t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    def save(self):
        for name, text in zip(OUT_FILES, (json.dumps(self.result, indent=1, default=str) + "\n",
                                          markdown(self.result))):
            atomic_write_bytes(os.path.join(self.args.out, name), text.encode())


def read_json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)


def run_step(ev, name, fn):
    """fn(ev, res) under the step's time cap (SIGALRM: the main thread only), what it prints kept in res["output"]
    for the page; a failure or timeout is recorded."""
    def fire(signum, frame):
        raise StepTimeout(f"time cap of {cap:.0f} s reached")

    cap = max(0.0, min(ev.sizes["caps"].get(name, float("inf")), ev.deadline - time.perf_counter()))
    res = ev.result["steps"][name] = dict(status="running", cap_s=round(cap, 1))
    t, out, alarm = time.perf_counter(), io.StringIO(), signal.signal(signal.SIGALRM, fire)
    ev.step_end = t + cap
    ev.say(f"== {name}: cap {cap:.0f} s")
    try:
        signal.setitimer(signal.ITIMER_REAL, max(cap, 0.01))
        with contextlib.redirect_stdout(out):
            fn(ev, res)
        res["status"] = "ok"
    except (Exception, StepTimeout) as e:
        res["status"] = "timeout" if isinstance(e, StepTimeout) else "failed"
        res["error"] = (f"{type(e).__name__}: {e}".splitlines() or ["?"])[0][:300]
        if not isinstance(e, StepTimeout):
            print("\n".join(traceback.format_exc().splitlines()[-12:]), file=sys.stderr, flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        res.update(seconds=round(time.perf_counter() - t, 1), output=out.getvalue())
        print(res["output"], end="", flush=True)
        torch._dynamo.reset()  # compiled code of this step's models: its memory, and in-process callers start clean
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ev.say(f"== {name}: {res['status']} in {res['seconds']:.0f} s {res.get('error', '')}")
        ev.save()


# ----------------------------------------------------------------------------------------------------- steps
def run_bench(ev, res, module, argv):
    """A benchmark's main in-process, its figures from its --json file (also what it wrote before a time cap)."""
    path = os.path.join(ev.work, module.__name__ + ".json")
    res["command"] = f"python benchmarks/{module.__name__}.py " + " ".join(argv)
    try:
        res["exit_code"] = module.main([*argv, "--json", path])
    finally:
        res["figures"] = read_json(path)


def train_run(ev, run, flags):
    """train.py in-process on the bundled cats; from its log: img/s of each progress line (the first includes
    set-up and compilation: the median of the others is the speed), the last step and loss."""
    import train

    t = time.perf_counter()
    code = train.main(["--dataset", "cifar", "--class", "cat", "--data-dir", ev.data_dir, "--device", ev.device,
                       "--out", run, *flags])
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()] or [{}]
    rates = [round(r["img_per_s"], 1) for r in log if "img_per_s" in r]
    return dict(command="python train.py " + " ".join(flags), exit_code=code, wall_s=round(time.perf_counter() - t, 1),
                img_s=statistics.median(rates[1:] or rates) if rates else None, img_s_lines=rates,
                steps=log[-1].get("step"), last_loss=log[-1].get("loss"))


def step_sampler(ev, res):
    """sample.py as a user runs it, on the loop's checkpoint (the time does not depend on how trained it is): the
    wall time of --n images, PNG writing included, after a 2-image run (cuDNN's and the allocator's first calls)."""
    import sample

    argv = ["--ckpt", os.path.join(ev.work, "loop"), "--device", ev.device, *ev.sizes["sampler"]]
    sample.main([*argv, "--n", "2", "--out", os.path.join(ev.work, "sampler-warm-up")])
    out, t = os.path.join(ev.work, "sampler"), time.perf_counter()
    res.update(command="python sample.py " + " ".join(ev.sizes["sampler"]),
               exit_code=sample.main([*argv, "--out", out]), wall_s=round(time.perf_counter() - t, 2),
               images=sum(f.endswith(".png") and f != "grid.png" for f in os.listdir(out)))


def step_fid(ev, res):
    argv = ["--cifar", ev.data_dir, "--weights", ev.weights, "--device", ev.device, "--skip", "fd", *ev.sizes["fid"]]
    if importlib.util.find_spec("pytorch_fid"):  # the reference; else the TorchScript FID Inception, where installed
        argv += ["--pytorch-fid-python", sys.executable, "--torchscript", "none"]
    run_bench(ev, res, bench_fid, argv)


@contextlib.contextmanager
def sigterm_after(seconds):
    """Send this process SIGTERM after `seconds`, once train.py's own handler is in place (it then saves a checkpoint
    and returns: its documented behaviour under a cluster's time limit). Around it SIGTERM is ignored, so a signal
    that lands early or late cannot kill the rest of the run."""
    def ignore(signum, frame):
        pass

    def fire():
        stop.wait(max(seconds, 0.0))
        while not stop.is_set() and signal.getsignal(signal.SIGTERM) is ignore:  # train.py is still starting
            stop.wait(SIGTERM_POLL_S)
        if not stop.is_set():  # (set: train.py is done)
            os.kill(os.getpid(), signal.SIGTERM)

    old, stop, thread = signal.signal(signal.SIGTERM, ignore), threading.Event(), threading.Thread(target=fire)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()  # a signal already on its way lands on `ignore`, not on the default handler
        signal.signal(signal.SIGTERM, old)


def step_quality(ev, res):
    import sample

    s, run, out = ev.sizes, os.path.join(ev.work, "quality"), os.path.join(ev.work, "report")
    res["train_budget_s"] = budget = round(ev.step_end - time.perf_counter() - s["report_reserve_s"], 1)
    if budget <= 0:
        raise StepTimeout("no time left to train")
    with sigterm_after(budget):  # the preset's --steps: the clock stops it first
        res.update(train_run(ev, run, s["quality"]))
    ev.save()
    res.update(report_command="python sample.py --report " + " ".join(s["report"]), report_exit_code=sample.main([
        "--ckpt", run, "--report", "--out", out, "--device", ev.device, "--data-dir", ev.data_dir,
        "--inception-weights", ev.weights, "--cache-dir", os.path.join(ev.work, "fid-cache"), *s["report"]]))
    res["report"] = read_json(os.path.join(out, "report.json"))
    with open(os.path.join(out, "report.md")) as f:
        res["report_md"] = f.read()
    for png in sorted(f for f in os.listdir(out) if f.endswith(".png"))[:REPORT_PNGS]:  # sample grid, closest pairs
        shutil.copyfile(os.path.join(out, png), os.path.join(ev.args.out, f"quality_{png}"))


STEPS = (("unet", lambda ev, res: run_bench(ev, res, bench_unet, ["--device", ev.device, *ev.sizes["unet"]])),
         ("loop", lambda ev, res: res.update(train_run(ev, os.path.join(ev.work, "loop"), ev.sizes["loop"]))),
         ("sampler", step_sampler), ("fid", step_fid), ("quality", step_quality))


# -------------------------------------------------------------------------------------------------- the page
def goals(result):
    """What each of GOALS measured (None where it was not)."""
    steps = result.get("steps", {})
    rows = [r for r in ((steps.get("unet", {}).get("figures") or {}).get("results") or []) if "train_img_s" in r]

    def ratio(figure, theirs_mode=None):  # best tinyddpm row / best diffusers row (in theirs_mode)
        ours, theirs = ([figure(r) for r in rows if (r["system"] == "tinyddpm") == mine and
                         (mine or theirs_mode in (None, r["mode"]))] for mine in (True, False))
        return max(ours) / max(theirs) if ours and theirs else None

    summary = ((steps.get("quality", {}).get("report") or {}).get("results") or [{}])[0]
    flagged = [v["fraction"] for v in (summary.get("memorisation") or {}).values()
               if isinstance(v, dict) and "fraction" in v]
    return [ratio(lambda r: r["train_img_s"], "bf16-compile"), ratio(bench_unet.best_sample), summary.get("ratio"),
            max(flagged, default=None)]


def _num(v, spec, unit=""):
    return "—" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, spec) + unit


def markdown(result):
    dev, steps = result.get("device", {}), result.get("steps", {})
    smoke = ". **Smoke run: CPU, toy sizes and toy data; the figures mean nothing.**" if result.get("smoke") else ""
    lines = [f"# GPU evidence: {dev.get('name', '?')}", "", f"{result.get('started')}; " +
             ", ".join(f"{k} {v}" for k, v in dev.items() if k != "name") + smoke, "",
             "| step | status | seconds | cap (s) |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {st['status']}{': ' + st['error'] if 'error' in st else ''} "
              f"| {_num(st.get('seconds'), '.0f')} | {_num(st.get('cap_s'), '.0f')} |" for name, st in steps.items()]
    lines += ["", "## Goals", "", "| goal | target | measured | met |", "|---|---:|---:|---|"]
    for (goal, target, cmp, spec, unit), m in zip(GOALS, goals(result)):
        met = "—" if m is None else ("yes" if (m >= target if cmp == ">=" else m <= target) else "no")
        lines.append(f"| {goal} | {cmp} {format(target, spec)}{unit} | {_num(m, spec, unit)} | {met} |")
    for name, st in steps.items():  # the scalar figures, the printed output, the report's table
        lines += ["", f"## {name}: `{st.get('command', '')}`", ""] + [
            f"- {k}: {v}" for k, v in st.items() if k not in ("command", "output", "report_md", "status", "error")
            and isinstance(v, (int, float, str, list)) and len(str(v)) < 200]
        lines += ["", "```text", st["output"].rstrip(), "```"] if st.get("output", "").strip() else []
        lines += ["", st["report_md"]] if st.get("report_md") else []
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- set-up
def setup(ev):
    folder, res = ev.args.bundle, ev.result
    if ev.args.smoke:
        folder = os.path.join(ev.work, "toy-bundle")
        os.makedirs(folder)
    res["bundle"] = dict(folder="toy (--smoke): " + make_toy_bundle(folder) if ev.args.smoke else folder)
    cats, verified = unpack_cats(os.path.join(folder, CATS))
    res["bundle"].update(cats={k: len(v) for k, v in cats.items()}, cats_pixels_verified=verified,
                         wheels=install_wheels(os.path.join(folder, WHEELS), os.path.join(ev.work, "site")))
    write_cifar_layout(ev.data_dir, cats["train"], cats["test"])
    ev.weights = os.path.join(folder, WEIGHTS)
    res["device"] = dict(name=torch.cuda.get_device_name() if ev.device == "cuda" else "cpu", torch=torch.__version__,
                         CUDA=torch.version.cuda, diffusers=bench_unet.diffusers_version(),
                         pytorch_fid=bool(importlib.util.find_spec("pytorch_fid")))
    if ev.device == "cuda" and shutil.which("nvidia-smi"):  # read-only: driver, memory, SM clock and power limits
        res["device"]["nvidia-smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv"],
            capture_output=True, text=True, timeout=30).stdout.strip().replace("\n", ": ")
    ev.say(f"{res['device']}; bundle {res['bundle']}")
    ev.save()


def main(argv=None):
    args = build_parser().parse_args(argv)
    folder = args.bundle if args.make_bundle else args.out
    if not folder:
        raise UserError("pass --out FOLDER for the run's figures, or --make-bundle")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder} is a file; pass a folder")
    if args.make_bundle:  # here, with network
        os.makedirs(args.bundle, exist_ok=True)
        print(f"cats: {make_cats(args.bundle, args.data_dir, args.jpeg_zip)}; weights: "
              f"{make_weights(args.bundle, args.weights)}")
        if not args.no_wheels and subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", os.path.join(
                args.bundle, WHEELS), *WHEEL_PLATFORM, *WHEEL_PINS]).returncode:
            raise UserError(f"pip download of {', '.join(WHEEL_PINS)} failed; check the network, or pass --no-wheels")
        check_size(args.bundle)
        print(f"bundle ready in {args.bundle}; on the GPU machine run the command in docs/gpu.md")
        return 0
    if not args.smoke and not os.path.isfile(os.path.join(args.bundle, CATS)):
        raise UserError(f"no bundle in {args.bundle}; run python benchmarks/gpu_evidence.py --make-bundle first "
                        "(docs/gpu.md)")
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible; this is the GPU evidence run: pass --smoke to check it on the CPU")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as work:
        ev = Evidence(args, SMOKE if args.smoke else FULL, work)
        setup(ev)
        for name, fn in STEPS:
            run_step(ev, name, fn)
    ev.result["wall_s"] = round(time.perf_counter() - ev.t0, 1)
    ev.save()
    print(markdown(ev.result))  # also in the log: the page survives where the files do not come back
    failed = [k for k, v in ev.result["steps"].items() if v["status"] != "ok"]
    ev.say(f"wrote {', '.join(OUT_FILES)} to {args.out}" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
