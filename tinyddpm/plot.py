"""A training curve from a run's log.jsonl, drawn with pillow (no matplotlib at run time).

    python -m tinyddpm.plot runs/<name>/log.jsonl --out curve.png              # diffusion: loss vs step
    python -m tinyddpm.plot runs/<gan run>/log.jsonl --keys d_loss g_loss      # DCGAN: both losses

Each key is a line of its own colour; the raw values are drawn faint and a running mean over SMOOTH_WINDOW log
lines on top, because the per-step diffusion loss is noisy (each image has its own random timestep). The y axis is
logarithmic when every value is positive (a diffusion loss falls by orders of magnitude), else linear.
"""
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from .errors import ArgumentParser, UserError, run_cli
from .files import atomic_save_image

WIDTH, HEIGHT = 640, 360  # pixels of the written PNG
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 24, 36
SMOOTH_WINDOW = 10  # log lines in the running mean
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))  # one per key
FAINT = 0.3  # opacity of the raw values under the running mean
TICKS = 5  # labelled values on each axis


def read_log(path, keys):
    """{key: (steps float [n], values float [n])} for every key present in the JSONL log."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a JSONL training log ({e.__class__.__name__}); pass a run's "
                        "log.jsonl") from None
    out = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r]
        if pts:
            out[k] = tuple(np.asarray(v, dtype=np.float64) for v in zip(*pts))
    if not out:
        raise UserError(f"{path} has no {' or '.join(keys)} values; pass --keys with names from its lines")
    return out


def running_mean(v, window=SMOOTH_WINDOW):
    """Mean of the last `window` values at each point (fewer at the start): same length as v."""
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def draw_curves(series, title="", log_y=None):
    """RGB image of the series {name: (x, y)} on shared axes, with the y range taken from the smoothed values.
    log_y: a logarithmic y axis (None: when every value is positive, since a loss falls by orders of magnitude)."""
    if log_y is None:
        log_y = all((y > 0).all() for _, y in series.values())
    if log_y:
        series = {k: (x, np.log10(y)) for k, (x, y) in series.items()}
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img, "RGBA")
    xs = np.concatenate([x for x, _ in series.values()])
    smooth = {k: running_mean(y) for k, (_, y) in series.items()}
    ys = np.concatenate(list(smooth.values()))
    x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
    y0, y1 = ys.min(), ys.max()
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    py = lambda y: bottom - (np.clip(y, y0, y1) - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(TICKS):
        xv, yv = x0 + (x1 - x0) * i / (TICKS - 1), y0 + (y1 - y0) * i / (TICKS - 1)
        d.text((px(xv) - 12, bottom + 6), f"{xv:.0f}", fill="black")
        d.text((4, py(yv) - 6), f"{10 ** yv if log_y else yv:.3g}", fill="black")
        d.line([left, py(yv), right, py(yv)], fill=(0, 0, 0, 24))
    d.text((left, 4), title + ("  (log scale)" if log_y else ""), fill="black")
    d.text((right - 30, bottom + 20), "step", fill="black")
    for n, (k, (x, y)) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        if len(x) > 1:
            d.line(list(zip(px(x), py(y))), fill=colour + (int(255 * FAINT),), width=1)
            d.line(list(zip(px(x), py(smooth[k]))), fill=colour, width=2)
        d.text((left + 8, top + 6 + 14 * n), k, fill=colour)
    return img


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("log", help="a run's log.jsonl")
    p.add_argument("--out", default=None, help="PNG to write (default: curve.png beside the log)")
    p.add_argument("--keys", nargs="+", default=["loss"], help="log fields to draw (default: loss)")
    p.add_argument("--linear", action="store_true", help="a linear y axis (default: logarithmic if all values > 0)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(args.log) or ".", "curve.png")
    if not out.lower().endswith(".png"):
        raise UserError(f"--out {out} must end in .png")
    series = read_log(args.log, args.keys)
    atomic_save_image(draw_curves(series, os.path.basename(os.path.dirname(os.path.abspath(args.log))),
                                  log_y=False if args.linear else None), out)
    print(f"wrote {out} ({', '.join(f'{k}: {len(v[0])} points' for k, v in series.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
