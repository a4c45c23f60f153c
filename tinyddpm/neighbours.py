"""Nearest neighbours between image sets: precision and recall, and a check for copies of the training set.

FID mixes two questions into one number: are the generated images realistic, and do they cover the variety of the
real ones? And a FID near the floor can also mean that the model reproduces its training images. These answer
each question apart, from vectors the report already has (Inception features; flattened pixels):

- **Precision and recall** (Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing
  generative models"). Each real vector gets a ball whose radius is the distance to its k-th nearest real
  neighbour (k = 3); the union of balls estimates the real manifold. Precision is the fraction of generated
  vectors inside it; recall swaps the roles (balls around the generated vectors, real vectors counted). As in
  NVlabs' metrics/precision_recall.py, "inside" is distance ≤ radius, so identical sets give 1 and 1.
- **Memorisation**: for each generated image its nearest training image. Real held-out (test) images are as near
  to the training set as an honest model's samples should be, so the 5th percentile of test-to-train nearest
  distances is the threshold: a generated image nearer than that is flagged. Test images themselves are flagged
  5 % of the time by construction; a model that copies its training set gets close to 100 %.

Distances are exact Euclidean ones in float64, computed block by block (about BLOCK_ELEMENTS numbers at a time)
so 1,000 samples against 50,000 training images never hold a 50,000-column matrix of more than a few rows.
"""
from dataclasses import dataclass

import numpy as np

K = 3  # neighbourhood size of Kynkäänniemi et al. (their and NVlabs' default)
MEMORISATION_PERCENTILE = 5  # test-to-train nearest distances below this percentile count as "as close as a copy"
BLOCK_ELEMENTS = 1 << 22  # float64 numbers per block of a distance matrix or of converted rows (32 MiB)
GRID_PAIRS = 8  # closest (generated, nearest train) pairs drawn per space


def _float_rows(x):
    """[N, ...] (uint8 pixels or float features) → [N, D] without copying more than a view."""
    x = np.asarray(x)
    return x.reshape(len(x), -1)


def _squared_norms(x, rows):
    """[N]: |x_i|² in float64, converting `rows` rows at a time."""
    out = []
    for j in range(0, len(x), rows):
        block = x[j:j + rows].astype(np.float64)
        out.append(np.einsum("ij,ij->i", block, block))
    return np.concatenate(out)


def distance_rows(a, b):
    """Yield (i0, D): D is float64 [r, len(b)], the Euclidean distances from rows a[i0:i0 + r] to every row of b.
    Rows are converted to float64 a block at a time (|x|² + |y|² − 2 x·y, clipped at 0 against round-off)."""
    a, b = _float_rows(a), _float_rows(b)
    cols = max(1, BLOCK_ELEMENTS // b.shape[1])  # rows of b converted at once
    b_sq = _squared_norms(b, cols)
    rows = max(1, BLOCK_ELEMENTS // max(len(b), a.shape[1]))  # rows of a per yielded block
    for i0 in range(0, len(a), rows):
        ab = a[i0:i0 + rows].astype(np.float64)
        d2 = _squared_norms(ab, rows)[:, None] + b_sq[None, :]
        for j in range(0, len(b), cols):
            d2[:, j:j + cols] -= 2 * ab @ b[j:j + cols].astype(np.float64).T
        yield i0, np.sqrt(np.maximum(d2, 0))


def nearest(queries, base):
    """(distance [Q], index [Q]) of each query row's nearest row of base."""
    dist, index = np.empty(len(queries)), np.empty(len(queries), dtype=np.int64)
    for i0, d in distance_rows(queries, base):
        index[i0:i0 + len(d)] = d.argmin(axis=1)
        dist[i0:i0 + len(d)] = d[np.arange(len(d)), index[i0:i0 + len(d)]]
    return dist, index


def kth_neighbour_radii(x, k=K):
    """[N]: each row's distance to its k-th nearest *other* row (its own distance 0 is the smallest)."""
    return np.concatenate([np.partition(d, k, axis=1)[:, k] for _, d in distance_rows(x, x)])


def fraction_inside(queries, base, radii):
    """Fraction of query rows within distance ≤ radii[j] of some base row j."""
    inside = [(d <= radii[None, :]).any(axis=1) for _, d in distance_rows(queries, base)]
    return float(np.concatenate(inside).mean())


def precision_recall(real, fake, k=K):
    """(precision, recall) of fake [M, d] against real [N, d]; (None, None) when a side has k rows or fewer (no
    k-th neighbour to set a radius)."""
    if min(len(real), len(fake)) <= k:
        return None, None
    return (fraction_inside(fake, real, kth_neighbour_radii(real, k)),
            fraction_inside(real, fake, kth_neighbour_radii(fake, k)))


@dataclass
class Memorisation:
    threshold: float  # the MEMORISATION_PERCENTILE-th percentile of test-to-train nearest distances
    fraction: float  # generated rows nearer to a training row than threshold
    distance: np.ndarray  # [G] each generated row's nearest training distance
    index: np.ndarray  # [G] and which training row that is

    def summary(self):
        return dict(threshold=self.threshold, fraction=self.fraction,
                    median_nearest_distance=float(np.median(self.distance)))


def memorisation(generated, test, train, percentile=MEMORISATION_PERCENTILE):
    """Nearest training row of each generated row, and the fraction nearer than the `percentile`-th percentile of
    the test rows' nearest training distances. Vectors: features [N, d] or pixels [N, H, W, C]."""
    test_dist, _ = nearest(test, train)
    threshold = float(np.percentile(test_dist, percentile))
    dist, index = nearest(generated, train)
    return Memorisation(threshold, float((dist < threshold).mean()), dist, index)


def closest_pairs(generated, train, founds, pairs=GRID_PAIRS):
    """uint8 [pairs · 2·len(founds), H, W, 3], row by row for a grid of 2·len(founds) columns: row i holds, for
    each Memorisation in `founds` (e.g. Inception, pixels), the generated image i-th nearest to the training set
    and its nearest training image."""
    columns = []
    for found in founds:
        order = np.argsort(found.distance, kind="stable")[:pairs]
        columns.append([(generated[i], train[found.index[i]]) for i in order])
    return np.stack([img for row in zip(*columns) for pair in row for img in pair])
