"""sample.py --report: FID-N, KID, precision/recall and memorisation against the dataset's test split, beside the
real-vs-real floor (the library: tinyddpm/report.py; docs/report.md)."""
from ..errors import UserError
from ..report import FEATURES, REPORT_N, ReportOptions, markdown, printable, run_report
from .common import flags_given, sampling_options, say

REPORT_ONLY = ("ref", "data_dir", "inception_weights", "cache_dir", "skip_bad", "train_images")


def add_args(p):
    g = p.add_argument_group("quality report (FID/KID against the dataset's reference split and its floor)")
    g.add_argument("--report", action="store_true",
                   help=f"generate --n images (default {REPORT_N}), print FID, KID and the real-vs-real floor")
    g.add_argument("--ref", default=None,
                   help="reference: a dataset reference (cifar10:cat:test; default: the test split of the model's "
                        "classes), a folder, a .npz statistics file or a .npy image array")
    g.add_argument("--data-dir", default=None,
                   help="where CIFAR-10 is read for the reference and floor (default: the checkpoint's --data-dir)")
    g.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="FID Inception weights (default: found as fid.py finds them, docs/fid.md)")
    g.add_argument("--cache-dir", default=None,
                   help="where reference features are cached (default ~/.cache/tinyddpm/fid)")
    g.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip unreadable images in a --ref folder (and say how many)")
    g.add_argument("--train-images", type=int, default=None, metavar="M",
                   help="memorisation check: search the first M (at least --n) train images of the model's classes "
                        "for each sample's nearest (default: all of them; 0: no check)")


def wanted(args):
    """True when any flag of this mode was given (so a stray --ref is an error, not silently ignored)."""
    return bool(args.report or flags_given(args, REPORT_ONLY))


def report_request(args):
    """The report's own flags as a ReportOptions."""
    return ReportOptions(ref=args.ref, data_dir=args.data_dir, inception_weights=args.inception_weights,
                         cache_dir=args.cache_dir, skip_bad=bool(args.skip_bad), train_images=args.train_images,
                         classes=tuple(args.classes or ()))


def run(args, loaded):
    """Measure, write report.json / report.md / the images into --out, print the table."""
    if not args.report:
        raise UserError(f"{' '.join(flags_given(args, REPORT_ONLY))} only apply with --report")
    if args.labels:
        raise UserError("--labels is for shapes models; a report on a class model takes --class")
    options = sampling_options(args, loaded, n=REPORT_N)
    summary = run_report(loaded, report_request(args), options, args.out, log=say)
    if options.n <= FEATURES:
        say(f"note: FID-{options.n} with {options.n} ≤ {FEATURES} images is biased upwards; compare it only with "
            f"its floor (same N, same reference) and with other FID-{options.n} figures")
    print(printable(markdown(summary)), end="")
    print(f"wrote report.json, report.md and the generated images to {args.out}")
    return 0
