"""GPU evidence in one command: the repository's own benchmarks and scripts on an offline GPU, every figure in one
JSON and one Markdown file in --out, sized to a 15-minute GPU window (docs/gpu.md).

    python benchmarks/make_gpu_bundle.py                                           # here, once: .carry/gpu-evidence/
    python3 benchmarks/gpu_evidence.py --bundle .carry/gpu-evidence --out "$OUT"   # on the GPU machine
    python benchmarks/gpu_evidence.py --smoke --out /tmp/evidence                  # CPU, toy sizes, toy bundle

Steps, each under a time cap (the last gets what is left of --budget-s); a failure or timeout is recorded, the next
step runs, and the JSON and Markdown are rewritten after every step:
  unet     bench_unet.py: tinyddpm vs diffusers UNet2DModel at ddpm-cifar, training (batch 128) and sampling forwards
           (batch 1,000): fp32, bf16 autocast, bf16 + torch.compile, eager and CUDA graph.
  loop     train.py on the bundled cats at ddpm-cifar: the real training loop's img/s.
  sampler  sample.py with its defaults on that checkpoint: 1,000 images in one batch, wall time.
  fid      bench_fid.py: Inception img/s on the 1,000 test cats, ours vs pytorch-fid on the same weights.
  quality  train.py --preset small on the cats until the clock sends SIGTERM (train.py then saves a checkpoint; the
           learning rate is constant after warm-up, so this equals --steps <steps reached>), then sample.py --report
           with its defaults: FID-1k against the test cats, the floor, memorisation.
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import torch  # noqa: E402

import bench_fid  # noqa: E402
import bench_unet  # noqa: E402
import make_gpu_bundle as bundle  # noqa: E402  (what travels, and how it is unpacked)
from tinyddpm.errors import UserError, run_cli  # noqa: E402
from tinyddpm.files import atomic_write_bytes  # noqa: E402

OUT_FILES = ("gpu_evidence.json", "gpu_evidence.md")
REPORT_PNGS = 2  # the report's sample grid and closest pairs, copied to --out (the device tool returns few files)
SIGTERM_POLL_S = 0.1  # how often the quality run's clock looks whether train.py's signal handler is in place
# Per step: the flags of the script it runs (besides data, device and folders). caps: seconds per step; the quality
# step gets the rest of budget_s, of which report_reserve_s is kept for the report.
FULL = dict(unet=["--config", "ddpm-cifar", "--sample-batch", "1000", "--repeats", "1"],
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
             fid=["--images", "4", "--batch-size", "4", "--repeats", "1", "--skip", "fd", "fid"],
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
    p.add_argument("--out", required=True, help="folder for gpu_evidence.json, gpu_evidence.md and two grids")
    p.add_argument("--bundle", default=bundle.DEFAULT_BUNDLE, help="folder made by make_gpu_bundle.py")
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, a toy bundle: checks the code paths")
    p.add_argument("--budget-s", type=float, help="seconds for the whole run (default 480; smoke 240)")
    return p


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
def step_unet(ev, res):
    path = os.path.join(ev.work, "bench_unet.json")
    argv = ["--device", ev.device, "--json", path, *ev.sizes["unet"]]
    res["command"] = "python benchmarks/bench_unet.py " + " ".join(argv)
    try:
        res["exit_code"] = bench_unet.main(argv)
    finally:
        res["figures"] = read_json(path)  # written after every row: also what a time cap interrupted


def train_run(ev, run, flags):
    """train.py in-process on the bundled cats; from its log: img/s of each progress line (the first includes
    set-up and compilation: the median of the others is the speed), the last step and loss."""
    import train

    t = time.perf_counter()
    code = train.main(["--dataset", "cifar", "--class", "cat", "--data-dir", ev.data_dir, "--device", ev.device,
                       "--out", run, *flags])
    with open(os.path.join(run, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()] or [{}]
    rates = [r["img_per_s"] for r in log if "img_per_s" in r]
    return dict(command="python train.py " + " ".join(flags), exit_code=code, wall_s=round(time.perf_counter() - t, 1),
                img_s=statistics.median(rates[1:] or rates) if rates else None, img_s_lines=rates,
                steps=log[-1].get("step"), last_loss=log[-1].get("loss"))


def step_loop(ev, res):
    res.update(train_run(ev, os.path.join(ev.work, "loop"), ev.sizes["loop"]))


def step_sampler(ev, res):
    """sample.py as a user runs it, on the loop's checkpoint (the time does not depend on how trained it is): the
    wall time of --n images, PNG writing included, after a 2-image run (cuDNN's and the allocator's first calls)."""
    import sample

    argv = ["--ckpt", os.path.join(ev.work, "loop"), "--device", ev.device, *ev.sizes["sampler"]]
    sample.main([*argv, "--n", "2", "--out", os.path.join(ev.work, "sampler-warm-up")])
    out, t = os.path.join(ev.work, "sampler"), time.perf_counter()
    res.update(command="python sample.py " + " ".join(ev.sizes["sampler"]), exit_code=sample.main([*argv, "--out", out]),
               wall_s=round(time.perf_counter() - t, 2),
               images=sum(f.endswith(".png") and f != "grid.png" for f in os.listdir(out)))


def step_fid(ev, res):
    path = os.path.join(ev.work, "bench_fid.json")
    argv = ["--cifar", ev.data_dir, "--weights", ev.weights, "--device", ev.device, "--skip", "fd", "--json", path,
            *ev.sizes["fid"]]
    if importlib.util.find_spec("pytorch_fid"):  # the reference; else the TorchScript FID Inception, where installed
        argv += ["--pytorch-fid-python", sys.executable, "--torchscript", "none"]
    res["command"] = "python benchmarks/bench_fid.py " + " ".join(argv)
    res.update(exit_code=bench_fid.main(argv), figures=read_json(path))


@contextlib.contextmanager
def sigterm_after(seconds):
    """Send this process SIGTERM after `seconds`, once train.py's own handler is in place (it then saves a checkpoint
    and returns: its documented behaviour under a cluster's time limit). Around it SIGTERM is ignored, so a signal
    that lands early or late cannot kill the rest of the run."""
    def ignore(signum, frame):
        pass

    def fire():
        if stop.wait(max(seconds, 0.0)):
            return
        while signal.getsignal(signal.SIGTERM) is ignore:  # train.py is still starting (or already done)
            if stop.wait(SIGTERM_POLL_S):
                return
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


STEPS = (("unet", step_unet), ("loop", step_loop), ("sampler", step_sampler), ("fid", step_fid),
         ("quality", step_quality))


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
    res["bundle"] = dict(folder="toy (--smoke): " + bundle.make_toy_bundle(folder) if ev.args.smoke else folder)
    cats, verified = bundle.unpack_cats(os.path.join(folder, bundle.CATS))
    res["bundle"].update(cats={k: len(v) for k, v in cats.items()}, cats_pixels_verified=verified,
                         wheels=bundle.install_wheels(os.path.join(folder, bundle.WHEELS), os.path.join(ev.work, "site")))
    bundle.write_cifar_layout(ev.data_dir, cats["train"], cats["test"])
    ev.weights = os.path.join(folder, bundle.WEIGHTS)
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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder")
    if not args.smoke and not os.path.isfile(os.path.join(args.bundle, bundle.CATS)):
        raise UserError(f"no bundle in {args.bundle}; run python benchmarks/make_gpu_bundle.py first (docs/gpu.md)")
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
