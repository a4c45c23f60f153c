"""Write the first images of a dataset reference as PNG files: inputs for `sample.py --fuse` and `--interpolate`.

    python -m tinyddpm.export cifar10:cat:test a.png b.png     # the first two test cats (CIFAR-10 from ./data)
    python -m tinyddpm.export cifar10:frog:train:100 f.png      # any split and classes fid.py reads

The reference is read as fid.py and sample.py --report read it (tinyddpm/sources.py), from --data-dir (downloaded
there if missing). An existing file is never overwritten.
"""
import os
import sys

from .config import DataConfig
from .errors import ArgumentParser, UserError, run_cli
from .imageio import save_png
from .sources import is_cifar_reference, load_cifar_reference, parse_cifar_reference


def build_parser():
    p = ArgumentParser(prog="python -m tinyddpm.export", description=__doc__)
    p.add_argument("reference", help="a dataset reference, cifar10:CLASSES:SPLIT[:N] (e.g. cifar10:cat:test)")
    p.add_argument("files", nargs="+", metavar="FILE", help="PNG files to write: image i of the reference to FILE i")
    p.add_argument("--data-dir", default=DataConfig.data_dir,
                   help=f"where CIFAR-10 is (downloaded there if missing; default {DataConfig.data_dir})")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not is_cifar_reference(args.reference):
        raise UserError(f"{args.reference!r} is not a dataset reference; write e.g. cifar10:cat:test")
    for path in args.files:
        if os.path.lexists(path):
            raise UserError(f"{path} already exists; choose another name (nothing was written)")
        if not path.lower().endswith(".png"):
            raise UserError(f"{path} must end in .png")
    ref = parse_cifar_reference(args.reference)
    images = load_cifar_reference(ref.with_count(len(args.files)), args.data_dir)  # uint8 [N, 32, 32, 3]
    for img, path in zip(images, args.files):
        save_png(img, path)
    print(f"wrote {len(args.files)} image(s) of {ref.spec}: {' '.join(args.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
