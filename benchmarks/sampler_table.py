"""FID-N and sampling time for every sampler at equal model calls (docs/samplers.md).

    python benchmarks/sampler_table.py --ckpt runs/cat-baseline/ckpt.pt --out runs/sampler-table
    python benchmarks/sampler_table.py --ckpt ... --out ... --calls 10 20 --samplers dpmpp-2m heun --ddpm
    python benchmarks/sampler_table.py --smoke --out /tmp/table     # toy size: a 1-step model, a stand-in network

Each row is one `sample.py --report` (tinyddpm/report.py: the same images, seeds, reference, floor and feature
cache), run in-process with the checkpoint loaded once; the reference's features are measured once and cached.
"calls" is the number of model evaluations (samplers.model_calls): what a user waits for. Heun spends an odd
number of calls (2n − 1), at most the column's. Writes sampler_table.json (every figure and setting) and
sampler_table.md (FID-N and seconds for N images per sampler and call count) into --out, and each row's report
(report.json, images, grid) into --out/rows/<row>/. A finished row also leaves rows/<row>/row.json, so a rerun
with the same checkpoint and settings skips it: a long table (DDPM-1000 alone takes half an hour on 2 cores) survives
a stop.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinyddpm.errors import UserError, run_cli  # noqa: E402

DEFAULT_CALLS = (10, 20, 50, 100)
# (label, sampler, options): DDIM as sample.py runs it today (η = 0) and stochastic (η = 1), then the solvers.
VARIANTS = (("ddim", "ddim", dict(eta=0.0)), ("ddim-eta1", "ddim", dict(eta=1.0)), ("dpmpp-2m", "dpmpp-2m", {}),
            ("dpmpp-2m-sde", "dpmpp-2m-sde", {}), ("heun", "heun", {}))
SMOKE = dict(n=4, calls=(2, 3), image_size=16, images=8)
# A U-Net small enough to train one step in seconds (the tests' micro model).
SMOKE_TRAIN_FLAGS = ["--preset", "tiny", "--base-channels", "32", "--channel-mults", "1", "1", "--num-res-blocks", "1",
                     "--attn-resolutions", "--timesteps", "100", "--batch-size", "4", "--warmup", "1", "--steps", "1",
                     "--log-every", "10", "--grid-size", "4", "--grid-steps", "3", "--sample-every", "1000",
                     "--save-every", "1000", "--device", "cpu"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to measure (not needed with --smoke)")
    p.add_argument("--out", required=True, help="folder for sampler_table.json/.md and the rows' reports")
    p.add_argument("--n", type=int, default=1000, help="images per row (FID-N; default 1000)")
    p.add_argument("--calls", type=int, nargs="+", default=list(DEFAULT_CALLS), help="model calls per image")
    p.add_argument("--samplers", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS],
                   help="rows to run (default all)")
    p.add_argument("--spacings", nargs="+", default=["uniform", "karras"], choices=["uniform", "karras"])
    p.add_argument("--ddpm", action="store_true", help="add the DDPM row (all T ancestral steps; slow)")
    p.add_argument("--report-args", default="", help="extra sample.py --report flags, e.g. \"--ref X --data-dir Y\"")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="toy size: a 1-step micro model and a stand-in network")
    return p


def plan(args):
    """The rows: (label, sampler, steps, options) for each variant × spacing × call count, then DDPM if asked."""
    rows = []
    for label, sampler, opts in VARIANTS:
        if label not in args.samplers:
            continue
        for spacing in args.spacings:
            for calls in args.calls:
                rows.append((f"{label} {spacing}", sampler, calls, dict(opts, spacing=spacing)))
    if args.ddpm:
        rows.append(("ddpm", "ddpm", None, {}))
    return rows


def run_row(loaded, base_argv, label, sampler, steps, opts, out):
    """One `sample.py --report` on the loaded model (its flags resolved as sample.py resolves them); returns its
    report.json with the row's settings added."""
    import sample
    from tinyddpm.cli.common import sampling_options
    from tinyddpm.cli.quality import report_request
    from tinyddpm.report import REPORT_N, run_report
    from tinyddpm.samplers import model_calls

    args = sample.build_parser().parse_args([*base_argv, "--out", out])
    args.sampler, args.steps, args.eta, args.spacing, args.churn = (sampler, steps, opts.get("eta"),
                                                                     opts.get("spacing"), opts.get("churn"))
    options = sampling_options(args, loaded, n=REPORT_N)
    summary = run_report(loaded, report_request(args), options, out)
    calls = model_calls(options.sampler, loaded.diffusion)
    r = summary["results"][0]
    return dict(row=label, sampler=sampler, steps=summary["steps"], model_calls=calls, **opts, fid=r["fid"],
                floor=r["floor"], ratio=r["ratio"], generate_seconds=r["generate_seconds"], n=summary["n"])


def cached_row(folder, key, compute):
    """compute() once per key: rows/<row>/row.json keeps the key and its result, so a rerun resumes the table."""
    path = os.path.join(folder, "row.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["result"]
    except (OSError, ValueError):
        pass  # no finished row here yet (or a torn one): measure it
    result = compute()
    from tinyddpm.files import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(dict(key=key, result=result), indent=2) + "\n").encode())
    return result


def markdown(results, n, calls_list):
    """Two tables: FID-N and seconds for N images, one line per row label, one column per call count."""
    labels = list(dict.fromkeys(r["row"] for r in results))
    by = {(r["row"], r["model_calls"] if r["sampler"] == "ddpm" else r["steps"]): r for r in results}
    floor = next((r["floor"] for r in results if r["floor"] is not None), None)
    out = [f"FID-{n} (floor {floor:.2f})" if floor is not None else f"FID-{n}", ""]
    for what, key, fmt in (("FID", "fid", "{:.2f}"), (f"seconds for {n} images", "generate_seconds", "{:.0f}")):
        out += [f"| {what} | " + " | ".join(f"{c} calls" for c in calls_list) + " |",
                "|---|" + "---:|" * len(calls_list)]
        for label in labels:
            if label == "ddpm":
                r = next(r for r in results if r["row"] == "ddpm")
                out.append(f"| ddpm ({r['model_calls']} calls) | {fmt.format(r[key])} |" + " |" * (len(calls_list) - 1))
                continue
            cells = []
            for c in calls_list:
                r = by.get((label, c))
                cell = "—" if r is None else fmt.format(r[key])
                if r is not None and r["model_calls"] != c:
                    cell += f" ({r['model_calls']})"  # heun's odd count, or a cap at t_start + 1
                cells.append(cell)
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def smoke_setup(out):
    """A 1-step micro model on a folder of toy images, the folder as the reference, a stand-in feature network."""
    import numpy as np
    import torch
    from PIL import Image

    import train
    from tinyddpm.errors import run_cli

    root = tempfile.mkdtemp(prefix="smoke-", dir=out)
    folder = os.path.join(root, "images")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(SMOKE["images"]):
        img = rng.integers(0, 256, (SMOKE["image_size"], SMOKE["image_size"], 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"img{i}.png"))
    if run_cli(train.main, ["--out", os.path.join(root, "run"), "--dataset", "folder", "--data-dir", folder,
                            "--image-size", str(SMOKE["image_size"]), *SMOKE_TRAIN_FLAGS]) != 0:
        raise SystemExit("smoke: training the micro model failed")

    class StandIn(torch.nn.Module):
        """[B, 3, H, W] in [0, 1] → 6 features (mean and spread of each channel) instead of the Inception's 2048."""
        weights_id, weights_path, weights_how, flavour = "sampler-table-stand-in", "none", "a smoke stand-in", "fid"

        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    return os.path.join(root, "run", "ckpt.pt"), ["--ref", folder, "--cache-dir", os.path.join(root, "cache")], StandIn()


def main(argv=None):
    args = build_parser().parse_args(argv)
    from tinyddpm import inception
    from tinyddpm.devices import resolve_device
    from tinyddpm.files import atomic_write_bytes
    from tinyddpm.generate import LoadedModel

    os.makedirs(args.out, exist_ok=True)
    extra, real_inception = args.report_args.split(), inception.load_inception
    if args.smoke:
        args.ckpt, smoke_extra, stand_in = smoke_setup(args.out)
        args.n, args.calls, extra = SMOKE["n"], list(SMOKE["calls"]), extra + smoke_extra
        inception.load_inception = lambda weights=None, device="cpu": stand_in  # the report loads it by name
    if not args.ckpt:
        raise UserError("--ckpt is required (or --smoke for the toy-size run)")
    try:
        loaded = LoadedModel(args.ckpt, resolve_device(args.device))
        base = ["--ckpt", args.ckpt, "--report", "--n", str(args.n), "--batch-size", str(args.batch_size),
                "--device", args.device, *extra]
        results = []
        for label, sampler, steps, opts in plan(args):
            name = label.replace(" ", "-") + ("" if steps is None else f"-{steps}")
            print(f"== {name}", file=sys.stderr, flush=True)
            folder = os.path.join(args.out, "rows", name)
            key = dict(ckpt=os.path.abspath(args.ckpt), ckpt_size=os.path.getsize(args.ckpt),
                       ckpt_mtime_ns=os.stat(args.ckpt).st_mtime_ns, n=args.n, sampler=sampler, steps=steps,
                       opts=opts, report_args=extra, batch_size=args.batch_size)
            results.append(cached_row(folder, key, lambda: run_row(loaded, base, label, sampler, steps, opts, folder)))
    finally:
        inception.load_inception = real_inception
    table = markdown(results, args.n, args.calls)
    summary = dict(ckpt=args.ckpt, step=loaded.step, n=args.n, calls=args.calls, device=str(loaded.device),
                   smoke=args.smoke, rows=results)
    atomic_write_bytes(os.path.join(args.out, "sampler_table.json"), (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(os.path.join(args.out, "sampler_table.md"), table.encode())
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
