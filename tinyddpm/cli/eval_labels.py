"""sample.py --eval-labels: a shapes model scored on the fixed held-out label sets by the evaluator (the library:
tinyddpm/cond_eval.py; docs/conditional.md)."""
import os

from ..cond_eval import (EXAMPLE_EVALUATOR, MAX_PER_SET, chance_accuracy, check_model, evaluate, label_sets,
                         load_matching_evaluator, write_results)
from ..errors import UserError
from ..files import prepare_output_dir
from ..shapes import EVAL_COUNT
from .common import Progress, sampling_options


def add_args(p):
    g = p.add_argument_group("conditional evaluation (shapes models)")
    g.add_argument("--eval-labels", action="store_true",
                   help="generate the fixed held-out label sets and print the evaluator's accuracy")
    g.add_argument("--evaluator", default=None,
                   help=f"shapes evaluator checkpoint ({EXAMPLE_EVALUATOR}; train: python -m tinyddpm.evaluator)")
    g.add_argument("--n-per-set", type=int, default=1, help="images per held-out label set (default 1)")
    g.add_argument("--n-sets", type=int, default=None,
                   help=f"use only the first N label sets of the list (default all {EVAL_COUNT})")
    g.add_argument("--cfg-sweep", type=float, nargs="+", default=None, metavar="W",
                   help="several guidance scales, e.g. --cfg-sweep 0 1 3: one accuracy table")


def wanted(args):
    """True when any flag of this mode was given (so a stray --evaluator is an error, not silently ignored)."""
    return bool(args.eval_labels or args.evaluator or args.cfg_sweep or args.n_sets is not None
                or args.n_per_set != 1)


def _request(args, loaded):
    """(label sets, guidance scales, SamplingOptions), every mistake caught before anything slow."""
    if not args.eval_labels:
        raise UserError("--evaluator, --n-per-set, --n-sets and --cfg-sweep only apply with --eval-labels")
    if not 1 <= args.n_per_set <= MAX_PER_SET:
        raise UserError(f"--n-per-set must be between 1 and {MAX_PER_SET} (got {args.n_per_set})")
    sets = label_sets(args.n_sets)
    scales, stand_in = args.cfg_sweep, None
    if scales is not None:  # a sweep sets each scale itself; one that guides (≠ 1, if any) is checked with the flags
        check_model(loaded, scales)
        stand_in = next((w for w in scales if w != 1.0), 1.0)
    options = sampling_options(args, loaded, n=args.n_per_set * len(sets), guidance_scale=stand_in)
    if args.classes or args.labels:
        raise UserError("--eval-labels uses the fixed held-out label sets; drop --class/--labels")
    if args.cfg_sweep is not None and args.cfg_scale is not None:
        raise UserError("give either --cfg-scale W or --cfg-sweep W1 W2 …, not both")
    if loaded.kind != "ddpm" and args.cfg_sweep is not None:
        raise UserError("--cfg-sweep only applies to diffusion models; this checkpoint is a DCGAN")
    if scales is None:
        scales = [options.guidance_scale]
        check_model(loaded, scales)
    return sets, scales, options


def run(args, loaded):
    """Generate, score, print one line per scale (a table for a sweep), write the grids and eval.json."""
    sets, scales, options = _request(args, loaded)
    evaluator = load_matching_evaluator(args.evaluator, loaded.image_size, loaded.device)
    out = prepare_output_dir(args.out)
    sampler = options.sampler
    how = "" if loaded.kind != "ddpm" else f", {sampler.name}" + ("" if sampler.name == "ddpm" else
                                                                  f" {sampler.calls()} steps")
    results, grids = [], {}
    for r in evaluate(loaded, evaluator, sets, args.n_per_set, scales, options,
                      progress=lambda w: Progress(f"w = {w:g}: ")):
        grids[r["cfg_scale"]] = r.pop("grid")
        results.append(r)
        print(f"accuracy: {100 * r['accuracy']:.1f}% on {r['images']} images of the held-out label sets "
              f"(w = {r['cfg_scale']:g}{how}, {r['seconds']:.0f}s)", flush=True)
    chance = chance_accuracy(sets)
    if len(results) > 1:
        print("\n|   w | accuracy | images | seconds |\n|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['cfg_scale']:g} | {100 * r['accuracy']:.1f}% | {r['images']} | {r['seconds']:.0f} |")
    print(f"chance (labels ranked independently of the image): {100 * chance:.1f}%")
    summary = dict(ckpt=os.fspath(loaded.path), step=loaded.step, evaluator=os.fspath(args.evaluator),
                   label_sets=len(sets), n_per_set=args.n_per_set, seed=options.seed, chance=chance, results=results)
    write_results(out, summary, sets, grids)
    print(f"wrote eval.json, eval_labels.txt and {len(results)} grid(s) to {out}")
    return 0
