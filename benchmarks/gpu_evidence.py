"""GPU evidence in one command: our U-Net against diffusers' (training and sampling speed), FID speed against
pytorch-fid, and a short quality run. Every figure goes into one JSON and one Markdown file in --out, sized to a
15-minute GPU window: at most 8 minutes on one H100/H200, compilation included (docs/gpu.md has the command).

    python benchmarks/make_gpu_bundle.py                                          # here, once: .carry/gpu-evidence/
    python3 benchmarks/gpu_evidence.py --bundle .carry/gpu-evidence --out "$OUT"   # on the GPU machine
    python benchmarks/gpu_evidence.py --smoke --out /tmp/evidence                 # CPU, toy sizes, under a minute

Sections, each with its own time cap; a failure or timeout is recorded and the next section runs, and the JSON is
rewritten after every measurement, so a run killed from outside still leaves everything measured so far.
  train    tinyddpm vs diffusers UNet2DModel at ddpm-cifar (35,746,307 parameters each), batch 128, 32 px, synthetic
           batches (benchmarks/bench_unet.py builds both): fp32, bf16 autocast, bf16 + torch.compile; img/s, peak
           memory, MFU (FLOPs counted by torch.utils.flop_counter). Then the real loop (train.py in-process on the
           bundled cats, a few hundred steps).
  sample   the network at batch 1,000 under the package's precision (bf16 autocast on CUDA): eager, CUDA graph,
           compiled, compiled + CUDA graph, both systems, in image-steps/s; our default sampler (DDIM 100) for 1,000
           images, wall time.
  fid      Inception images/s on 1,000 train + 1,000 test cats, ours vs pytorch-fid (else the TorchScript FID
           Inception), and the FID each gives on those images (the real-vs-real floor).
  quality  train.py --preset small on the cats for a fixed wall time, stopped by SIGTERM (train.py then saves a
           checkpoint; the learning rate is constant after warm-up, so this equals --steps <steps reached>), then
           sample.py --report: FID-1k against the 1,000 test cats, the floor, and whatever else the report gives.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_unet as bench  # noqa: E402
import make_gpu_bundle as bundle  # noqa: E402  (what travels, and how it is unpacked)
from gpu_evidence_md import markdown  # noqa: E402
from gpu_fid import section_fid  # noqa: E402
from gpu_sections import (SectionTimeout, free_memory, one_line, section_quality, section_sample,  # noqa: E402
                          section_train)
from tinyddpm.errors import UserError, run_cli  # noqa: E402
from tinyddpm.files import atomic_write_bytes  # noqa: E402
from tinyddpm.generate import DEFAULT_STEPS  # noqa: E402

# Dense bf16 tensor-core peaks by GPU name, first match wins (NVIDIA's datasheets; the H200 SXM has the H100 SXM's).
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": bench.H100_BF16_DENSE_TFLOPS, "H200": bench.H100_BF16_DENSE_TFLOPS}
OUT_FILES = ("gpu_evidence.json", "gpu_evidence.md")
SECTIONS = (("train", section_train), ("sample", section_sample), ("fid", section_fid),
            ("quality", section_quality))


@dataclasses.dataclass(frozen=True)
class Sizes:
    unet: str  # U-Net preset of the speed sections
    batch: int  # training batch
    iters: int  # timed calls per measurement
    warmup: int  # untimed calls first (compilation happens here)
    sample_batch: int  # images per denoising call, and images of the sampler run
    sampler_steps: int  # model calls of sample.py's default sampler
    loop_flags: tuple  # train.py flags of the real-loop run (besides data, preset, output)
    fid_images: int  # images per side (train cats vs test cats)
    fid_batch: int
    fid_repeats: int
    quality_preset: str
    quality_steps: int  # the run's --steps (None: the preset's); the clock usually stops it first
    quality_flags: tuple  # extra train.py flags of the quality run
    report_flags: tuple  # extra sample.py --report flags
    report_variants: tuple  # one report per entry (its extra flags), while time is left
    caps: dict  # seconds per section; the quality section (last) gets what is left of budget_s
    report_reserve_s: float  # of the quality section, kept for the report(s)
    budget_s: float  # the whole run


FULL = Sizes(unet="ddpm-cifar", batch=128, iters=20, warmup=5, sample_batch=1000, sampler_steps=DEFAULT_STEPS,
             loop_flags=("--steps", "200", "--log-every", "50", "--grid-size", "16", "--grid-steps", "10"),
             fid_images=1000, fid_batch=250, fid_repeats=3,
             quality_preset="small", quality_steps=None, quality_flags=("--log-every", "250"), report_flags=(),
             report_variants=((), ("--eta", "1")),
             caps=dict(train=135, sample=75, fid=30), report_reserve_s=60, budget_s=480)
SMOKE = Sizes(unet="tiny", batch=4, iters=2, warmup=1, sample_batch=8, sampler_steps=3,
              loop_flags=("--steps", "4", "--log-every", "2", "--batch-size", "4", "--grid-size", "4",
                          "--grid-steps", "2"),
              fid_images=4, fid_batch=4, fid_repeats=1,
              quality_preset="tiny", quality_steps=6, quality_flags=("--log-every", "3", "--batch-size", "4"),
              report_flags=("--n", "4", "--steps", "2", "--batch-size", "4"), report_variants=((),),
              caps=dict(train=60, sample=60, fid=60), report_reserve_s=20, budget_s=240)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_evidence.json, gpu_evidence.md and grids")
    p.add_argument("--bundle", default=bundle.DEFAULT_BUNDLE, help="folder made by make_gpu_bundle.py")
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, a toy bundle: checks the code paths")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run (default 480; smoke 240)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by GPU name, H100/H200)")
    p.add_argument("--quality-compile", action="store_true", help="train the quality run with --compile")
    return p


# ---------------------------------------------------------------------------------------------- the run's state
class Evidence:
    """Sizes, device, folders and the result of one run; `save()` rewrites the JSON and Markdown atomically."""

    def __init__(self, args, sizes, device, work):
        self.args, self.sizes, self.device, self.work = args, sizes, device, work
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + (args.budget_s or sizes.budget_s)
        self.section_end = self.deadline
        # --smoke: Dynamo's tracing without Inductor's code generation, which takes minutes on a CPU
        self.compile = partial(torch.compile, backend="eager") if args.smoke else torch.compile
        self.result = dict(smoke=args.smoke, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           budget_s=args.budget_s or sizes.budget_s, sizes=dataclasses.asdict(sizes), sections={})

    def say(self, msg):
        print(f"[{time.perf_counter() - self.t0:5.0f} s] {msg}", flush=True)

    def left(self):
        """Seconds left in the current section."""
        return self.section_end - time.perf_counter()

    def save(self):
        out = self.args.out
        atomic_write_bytes(os.path.join(out, OUT_FILES[0]), (json.dumps(clean(self.result), indent=1) + "\n").encode())
        atomic_write_bytes(os.path.join(out, OUT_FILES[1]), markdown(self.result).encode())

    def attempt(self, into, key, fn, skip=None):
        """into[key] = fn() (a dict of figures), or {"skipped": why} or {"error": ...}; saved after each one."""
        t = time.perf_counter()
        if skip:
            into[key] = dict(skipped=skip)
        else:
            try:
                into[key] = fn()
            except Exception as e:  # one failing variant (compile, capture, out of memory) must not lose the others
                into[key] = dict(error=one_line(e))
                print("\n".join(traceback.format_exc().splitlines()[-8:]), file=sys.stderr, flush=True)
            into[key]["seconds"] = round(time.perf_counter() - t, 1)
        free_memory(self.device)
        self.say(f"{key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in
                                       into[key].items() if not isinstance(v, (dict, list)) and len(str(v)) < 100))
        self.save()
        return into[key]


def clean(x):
    """JSON-safe: numpy scalars → Python, NaN/Inf → None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)


@contextlib.contextmanager
def time_cap(seconds):
    """SectionTimeout in the main thread after `seconds` (SIGALRM); off the main thread, no hard cap."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"section time cap of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(ev, name, fn):
    """fn(ev, res) under the section's cap (the quality section gets what is left of the budget)."""
    cap = max(0.0, min(ev.sizes.caps.get(name) or math.inf, ev.deadline - time.perf_counter()))
    res = ev.result["sections"][name] = dict(status="running", cap_s=round(cap, 1))
    t = time.perf_counter()
    ev.section_end = t + cap
    ev.say(f"== {name}: cap {cap:.0f} s")
    try:
        if cap <= 0:
            raise SectionTimeout("no time left in the run's budget")
        with time_cap(cap):
            fn(ev, res)
        res["status"] = "ok"
    except (Exception, SectionTimeout) as e:
        res["status"], res["error"] = ("timeout" if isinstance(e, SectionTimeout) else "failed"), one_line(e)
        if not isinstance(e, SectionTimeout):
            print("\n".join(traceback.format_exc().splitlines()[-12:]), file=sys.stderr, flush=True)
    finally:
        res["seconds"] = round(time.perf_counter() - t, 1)
        free_memory(ev.device)
        error = f" ({res['error']})" if "error" in res else ""
        ev.say(f"== {name}: {res['status']} in {res['seconds']:.0f} s{error}")
        ev.save()


# ----------------------------------------------------------------------------------------------------- set-up
def setup(ev):
    args, dev, res = ev.args, ev.device, ev.result
    res["device"] = dict(name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                         torch=torch.__version__, cuda=torch.version.cuda, cpus=os.cpu_count(),
                         python=sys.version.split()[0], tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                         tf32_cudnn=torch.backends.cudnn.allow_tf32)
    if dev.type == "cuda":
        try:  # read-only query: name, driver, memory, the SM clock limit and the power limit as found
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                  "power.limit", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            res["device"]["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            res["device"]["nvidia_smi"] = one_line(e)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in res["device"]["name"]), None)
    res["peak_tflops"] = peak
    folder = args.bundle
    if args.smoke:
        folder = os.path.join(ev.work, "toy-bundle")
        os.makedirs(folder)
        res["bundle"] = dict(folder="toy (--smoke)", weights=bundle.make_toy_bundle(folder))
    elif not os.path.isfile(os.path.join(folder, bundle.CATS)):
        raise UserError(f"no bundle in {folder}; run python benchmarks/make_gpu_bundle.py first (docs/gpu.md)")
    else:
        manifest = os.path.join(folder, bundle.MANIFEST)
        res["bundle"] = dict(folder=folder, **(json.load(open(manifest)) if os.path.isfile(manifest) else {}))
    ev.cats, verified = bundle.unpack_cats(os.path.join(folder, bundle.CATS))
    res["bundle"].update(cats={k: len(v) for k, v in ev.cats.items()}, cats_pixels_verified=verified)
    ev.data_dir = bundle.write_cifar_layout(os.path.join(ev.work, "data"), ev.cats["train"], ev.cats["test"])
    ev.weights = os.path.join(folder, bundle.WEIGHTS)
    res["bundle"]["wheels_install"] = bundle.install_wheels(os.path.join(folder, bundle.WHEELS), os.path.join(ev.work, "site"))
    ev.diffusers_why = None
    try:
        import diffusers
        res["device"]["diffusers"] = diffusers.__version__
        ev.diffusers = True
    except Exception as e:  # ImportError, or a version clash inside diffusers' own imports
        ev.diffusers, ev.diffusers_why = False, f"diffusers is not importable ({one_line(e)})"
    ev.say(f"{res['device']['name']}, torch {torch.__version__}, diffusers {res['device'].get('diffusers')}, "
           f"bundle {res['bundle']['folder']}, cats {res['bundle']['cats']} verified {verified}, "
           f"peak {peak} TFLOP/s; budget {res['budget_s']:.0f} s")
    ev.save()


# -------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder")
    name = args.device or ("cpu" if args.smoke else "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible; this is the GPU evidence run: pass --smoke to check it on the CPU")
    os.makedirs(args.out, exist_ok=True)
    sizes = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="gpu-evidence-") as work:
        hub = torch.hub.get_dir()
        torch.hub.set_dir(os.path.join(work, "hub"))  # pytorch-fid's checkpoint goes here, never into ~/.cache
        try:
            ev = Evidence(args, sizes, torch.device(name), work)
            setup(ev)
            for section, fn in SECTIONS:
                run_section(ev, section, fn)
        finally:
            torch.hub.set_dir(hub)
            torch._dynamo.reset()  # compiled code of this run's models; in-process callers (tests) start clean
    ev.result["wall_s"] = round(time.perf_counter() - ev.t0, 1)
    ev.save()
    print(markdown(ev.result))
    failed = [k for k, v in ev.result["sections"].items() if v["status"] != "ok"]
    ev.say(f"wrote {', '.join(OUT_FILES)} to {args.out}" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
