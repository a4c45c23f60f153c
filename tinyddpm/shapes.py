"""The "shapes" dataset: procedurally rendered scenes of 1–3 coloured solids, a stand-in for i-CLEVR.

Each scene shows 1–3 objects out of 8 colours × 3 shapes (cube, sphere, cylinder) on a grey gradient floor, lit
from the upper left, with soft shadows. A scene's label is the *set* of its objects, as a 24-d multi-hot vector
(index = colour_index * 3 + shape_index, the order of `VOCAB`) or as text ("red cube, blue sphere"). No
(colour, shape) pair appears twice in one scene, since a multi-hot vector cannot say "two red cubes".

Everything is deterministic from a seed and needs only numpy and pillow, so anyone can regenerate the data:
nothing is downloaded and nothing is cached on disk.

How a scene is drawn (fast enough for tens of thousands of scenes in seconds):
  1. each (colour, shape, radius) object is rendered once, SUPERSAMPLE× larger, as premultiplied RGB + alpha +
     shadow layers, then downsampled with LANCZOS (the anti-aliasing) and kept in an in-memory cache;
  2. a scene samples a non-overlapping layout (centres and radii) and pastes the cached sprites on the floor:
     all shadows first (they only darken the floor), then the objects.

The label sets are split like i-CLEVR's "new_test": every 2- and 3-object set is put in "train" or "test" by a
hash of its canonical text, so test scenes show combinations of objects never seen together in training
(single objects are always "train": one object is not a combination). `eval_label_sets()` is a fixed list of
held-out label sets to condition a generator on; `tinyddpm.evaluator` scores the generated images.
"""
import functools
import hashlib
import itertools

import numpy as np
from PIL import Image

from .errors import UserError

# ------------------------------------------------------------------------------------------------ vocabulary
# i-CLEVR's eight colours, with CLEVR's RGB values (0..255).
COLOUR_RGB = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
COLOURS = tuple(COLOUR_RGB)
SHAPES = ("cube", "sphere", "cylinder")
VOCAB = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # index = colour_index * len(SHAPES) + shape_index
NUM_LABELS = len(VOCAB)  # 24
MAX_OBJECTS = 3
ALIASES = {"grey": "gray", "ball": "sphere"}  # spellings the parser also accepts
SPLITS = ("train", "test")

# ------------------------------------------------------------------------------------------------ split
TEST_PERCENT = 20  # share of the 2- and 3-object label sets held out for testing
EVAL_SEED = 20240607  # fixes the evaluation list; changing it changes every reported figure
EVAL_COUNT = 256  # label sets in the evaluation list

# ------------------------------------------------------------------------------------------------ rendering
SIZES = (32, 64)  # resolutions the renderer is tuned for (others work; objects scale with the image)
SUPERSAMPLE = 4  # objects are drawn this many times larger, then LANCZOS-downsampled (anti-aliasing)
RADIUS_RANGE = (0.11, 0.16)  # object radius (its bounding circle) as a fraction of the image side
GAP = 0.06  # free space between two bounding circles, fraction of the side (> the pixel-rounding error at 32 px)
EDGE = 0.02  # free space between a bounding circle and the border, fraction of the side (> rounding at 32 px)
LAYOUT_TRIES = 100  # placements tried for one object before the whole layout starts again
FLOOR_TOP, FLOOR_BOTTOM = 0.78, 0.58  # floor brightness (0..1) at the top (far) and bottom (near) row
FLOOR_JITTER = 0.05  # ± relative floor brightness per scene
# Lighting: one directional light from the upper left and in front (x right, y down, z towards the viewer).
LIGHT = np.array([-0.4, -0.8, 0.6]) / np.linalg.norm([-0.4, -0.8, 0.6])
VIEW = np.array([0.0, 0.0, 1.0])
HALF = (LIGHT + VIEW) / np.linalg.norm(LIGHT + VIEW)  # Blinn-Phong half vector
AMBIENT = 1.0 - LIGHT[2]  # chosen so a surface facing the viewer has shade 1: object centres show the true colour
DIFFUSE = 1.0
SPECULAR, SHININESS = 0.6, 40.0  # sphere highlight
# Shapes in units of the bounding-circle radius (u right, v down, centre 0).
CUBE_DEPTH = (0.4, 0.35)  # oblique projection: the back face is shifted right and up by these × the side
CYL_PROPORTIONS = (1.0, 0.35, 1.3)  # (half-width, half-height of the elliptic top, body height), scaled to fit
SHADOW_CENTRE, SHADOW_RADII, SHADOW_STRENGTH = (0.35, 0.6), (1.0, 0.45), 0.35  # soft ellipse below-right
SPRITE_HALF = 1.45  # sprite canvas half-side in radii: holds the object and its shadow


# ------------------------------------------------------------------------------------------------ labels
def _known():
    return f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}"


def check_objects(objects):
    """Validate a list of (colour, shape) pairs; returns their sorted VOCAB indices. UserError if not a label set."""
    if len(objects) == 0:
        raise UserError(f"empty label set; name 1-{MAX_OBJECTS} objects like 'red cube, blue sphere' ({_known()})")
    if len(objects) > MAX_OBJECTS:
        raise UserError(f"{len(objects)} objects given, at most {MAX_OBJECTS} per scene; drop some ({_known()})")
    indices = []
    for colour, shape in objects:
        if colour not in COLOUR_RGB:
            raise UserError(f"unknown colour {colour!r}; {_known()}")
        if shape not in SHAPES:
            raise UserError(f"unknown shape {shape!r}; {_known()}")
        idx = COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)
        if idx in indices:
            raise UserError(f"'{colour} {shape}' is named twice; each object may appear once per scene ({_known()})")
        indices.append(idx)
    return tuple(sorted(indices))


def parse_labels(text) -> np.ndarray:
    """'Red cube,  blue sphere' → float32 multi-hot [24]. Case and spacing do not matter; UserError on bad input."""
    if not text or not text.strip():
        raise UserError(f"empty label set; name 1-{MAX_OBJECTS} objects like 'red cube, blue sphere' ({_known()})")
    objects = []
    for item in text.split(","):
        words = [ALIASES.get(w, w) for w in item.lower().split()]
        if len(words) != 2:
            raise UserError(f"{item.strip()!r} in {text.strip()!r} is not '<colour> <shape>' (objects are "
                            f"separated by commas; {_known()})")
        objects.append(tuple(words))
    return objects_to_multi_hot(objects)


def objects_to_multi_hot(objects) -> np.ndarray:
    """[(colour, shape), ...] → float32 multi-hot [24]."""
    multi_hot = np.zeros(NUM_LABELS, np.float32)
    multi_hot[list(check_objects(objects))] = 1.0
    return multi_hot


def multi_hot_to_objects(multi_hot):
    """Multi-hot [24] (numpy, torch or list; entries > 0.5 count) → [(colour, shape), ...] in VOCAB order."""
    values = np.asarray(multi_hot, dtype=np.float32).reshape(-1)
    if values.shape[0] != NUM_LABELS:
        raise ValueError(f"a multi-hot label has {NUM_LABELS} entries, got {values.shape[0]}")
    return [tuple(VOCAB[i].split()) for i in np.flatnonzero(values > 0.5)]


def labels_to_text(multi_hot) -> str:
    """Multi-hot [24] → 'red cube, blue sphere' (VOCAB order; parse_labels reads it back)."""
    return ", ".join(f"{c} {s}" for c, s in multi_hot_to_objects(multi_hot))


# ------------------------------------------------------------------------------------------------ split
def _split_of(indices):
    """'train' or 'test' for a label set (sorted VOCAB indices), from a hash of its text: the same on every machine."""
    if len(indices) == 1:
        return "train"
    key = ", ".join(VOCAB[i] for i in indices).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


@functools.lru_cache(maxsize=None)
def _label_sets_by_count(split):
    """{k: tuple of label sets (sorted index tuples) with k objects} for one split, k = 1..MAX_OBJECTS."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    by_count = {}
    for k in range(1, MAX_OBJECTS + 1):
        by_count[k] = tuple(s for s in itertools.combinations(range(NUM_LABELS), k) if _split_of(s) == split)
    return by_count


def label_sets(split):
    """Every label set of a split as sorted tuples of VOCAB indices (the two splits are disjoint and cover all)."""
    return [s for sets in _label_sets_by_count(split).values() for s in sets]


def _indices_to_objects(indices):
    return [tuple(VOCAB[i].split()) for i in indices]


def sample_label_set(rng, split="train"):
    """1–3 distinct (colour, shape) objects whose set belongs to `split`: the object count is uniform over the
    counts the split has (test: 2 or 3), then the set is uniform among that split's sets of that count."""
    by_count = _label_sets_by_count(split)
    counts = [k for k, sets in by_count.items() if sets]
    sets = by_count[counts[rng.integers(len(counts))]]
    return _indices_to_objects(sets[rng.integers(len(sets))])


@functools.lru_cache(maxsize=1)
def _eval_label_sets():
    rng = np.random.default_rng(EVAL_SEED)
    test_sets = label_sets("test")
    chosen = rng.choice(len(test_sets), size=EVAL_COUNT, replace=False)
    return tuple(test_sets[i] for i in chosen)


def eval_label_sets():
    """The fixed list of EVAL_COUNT held-out label sets (all from the test split) a generator is evaluated on."""
    return [_indices_to_objects(s) for s in _eval_label_sets()]


# ------------------------------------------------------------------------------------------------ object sprites
def _cylinder_dims():
    """(a, b, h) of CYL_PROPORTIONS scaled so the silhouette's farthest point from the centre is at distance 1.

    The farthest points lie on the top and bottom ellipses, (a cos θ, ±(h/2 + b sin θ)); we maximise numerically.
    """
    a, b, h = CYL_PROPORTIONS
    theta = np.linspace(0, np.pi / 2, 2001)
    reach = np.sqrt((a * np.cos(theta)) ** 2 + (h / 2 + b * np.sin(theta)) ** 2).max()
    return a / reach, b / reach, h / reach


def _lambert(normal_dot_light):
    return AMBIENT + DIFFUSE * np.maximum(normal_dot_light, 0.0)


def _draw_shape(shape, u, v):
    """Silhouette mask and shade (brightness multiplier) of a shape on a grid (u right, v down, radius 1).

    Returns (mask bool [n, n], shade float [n, n], highlight float [n, n]: white added on top).
    """
    zero = np.zeros_like(u)
    if shape == "sphere":
        rr = u * u + v * v
        mask = rr <= 1.0
        nz = np.sqrt(np.clip(1.0 - rr, 0.0, None))  # surface normal (u, v, nz)
        shade = _lambert(u * LIGHT[0] + v * LIGHT[1] + nz * LIGHT[2])
        highlight = SPECULAR * np.maximum(u * HALF[0] + v * HALF[1] + nz * HALF[2], 0.0) ** SHININESS
        return mask, shade, highlight * mask
    if shape == "cube":
        # Oblique view: the front square, the top face and the right face. Its two farthest corners (front
        # bottom-left, back top-right) sit on the unit circle, so the side s solves (s(1+dx))² + (s(1+dy))² = 4.
        dx, dy = CUBE_DEPTH
        s = 2.0 / np.hypot(1 + dx, 1 + dy)
        x0, y1 = -s * (1 + dx) / 2, s * (1 + dy) / 2  # front face: x0..x0+s, y1-s..y1
        y0 = y1 - s
        front = (u >= x0) & (u <= x0 + s) & (v >= y0) & (v <= y1)
        t_top = (y0 - v) / (s * dy)  # 0 at the front edge of the top face, 1 at its back edge
        top = (t_top >= 0) & (t_top <= 1) & (u >= x0 + t_top * s * dx) & (u <= x0 + s + t_top * s * dx)
        t_side = (u - (x0 + s)) / (s * dx)
        side = (t_side > 0) & (t_side <= 1) & (v >= y0 - t_side * s * dy) & (v <= y1 - t_side * s * dy)
        top &= ~front
        shade = np.where(front, _lambert(LIGHT[2]), np.where(top, _lambert(-LIGHT[1]), _lambert(LIGHT[0])))
        return front | top | side, shade, zero
    if shape == "cylinder":
        a, b, h = _cylinder_dims()
        top = (u / a) ** 2 + ((v + h / 2) / b) ** 2 <= 1.0
        body = (np.abs(u) <= a) & (v >= -h / 2) & (v <= h / 2)
        bottom = (u / a) ** 2 + ((v - h / 2) / b) ** 2 <= 1.0
        nx = np.clip(u / a, -1.0, 1.0)  # body normal (nx, 0, nz): a vertical cylinder
        body_shade = _lambert(nx * LIGHT[0] + np.sqrt(1.0 - nx * nx) * LIGHT[2])
        shade = np.where(top, _lambert(-LIGHT[1]), body_shade)
        return top | body | bottom, shade, zero
    raise ValueError(f"unknown shape {shape!r}")


def _downsample(layer, n):
    """float [N, N] → float [n, n] with LANCZOS (PIL's float mode keeps full precision)."""
    return np.asarray(Image.fromarray(layer.astype(np.float32)).resize((n, n), Image.LANCZOS))


@functools.lru_cache(maxsize=4096)
def _sprite(colour, shape, radius_q):
    """One object, rendered SUPERSAMPLE× larger and downsampled: the pieces a scene pastes.

    radius_q is the radius in 1/SUPERSAMPLE pixels of the output (an integer, so sprites can be cached).
    Returns float32 (premultiplied RGB [n, n, 3] in 0..1, 1 - alpha [n, n, 1], 1 - shadow [n, n, 1]);
    n = 2·half + 1 and the object's centre is the centre of pixel (half, half).
    """
    half = int(np.ceil(SPRITE_HALF * radius_q / SUPERSAMPLE)) + 2  # + LANCZOS support
    n = 2 * half + 1
    big = n * SUPERSAMPLE
    coords = (np.arange(big) + 0.5 - big / 2) / radius_q  # pixel centres, in radii, 0 at the sprite centre
    u, v = np.meshgrid(coords, coords)  # u along x (columns), v along y (rows)
    mask, shade, highlight = _draw_shape(shape, u, v)
    rgb = np.asarray(COLOUR_RGB[colour], np.float64) / 255.0
    colour_big = np.clip(rgb * shade[..., None] + highlight[..., None], 0.0, 1.0) * mask[..., None]
    su, sv = (u - SHADOW_CENTRE[0]) / SHADOW_RADII[0], (v - SHADOW_CENTRE[1]) / SHADOW_RADII[1]
    shadow_big = SHADOW_STRENGTH * np.clip(1.0 - (su * su + sv * sv), 0.0, 1.0) ** 0.5  # soft-edged ellipse
    alpha = np.clip(_downsample(mask.astype(np.float32), n), 0.0, 1.0)
    premult = np.stack([_downsample(colour_big[..., c], n) for c in range(3)], axis=-1)
    premult = np.clip(premult, 0.0, alpha[..., None])  # LANCZOS rings slightly; keep colour ≤ coverage
    shadow = np.clip(_downsample(shadow_big, n), 0.0, 1.0)
    # Stored as the factors a scene multiplies and adds, [n, n, 1] so they broadcast over RGB.
    return premult.astype(np.float32), (1.0 - alpha)[..., None].astype(np.float32), \
        (1.0 - shadow)[..., None].astype(np.float32)


@functools.lru_cache(maxsize=len(SIZES) + 4)
def _floor(size):
    """float32 [size, size, 3]: a neutral grey, lighter at the back (top) than at the front (bottom)."""
    rows = np.linspace(FLOOR_TOP, FLOOR_BOTTOM, size, dtype=np.float32)
    return np.repeat(np.repeat(rows[:, None, None], size, axis=1), 3, axis=2)


# ------------------------------------------------------------------------------------------------ scenes
def _sample_layout(rng, count):
    """`count` non-overlapping bounding circles inside the unit square: [(x, y, r), ...] as fractions of the side."""
    while True:
        placed = []
        for _ in range(count):
            for _ in range(LAYOUT_TRIES):
                r = rng.uniform(*RADIUS_RANGE)
                x, y = rng.uniform(r + EDGE, 1.0 - r - EDGE, size=2)
                if all(np.hypot(x - px, y - py) >= r + pr + GAP for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
            else:
                break  # this object found no room: start the layout again
        if len(placed) == count:
            return placed


def _window(size, n, cx, cy):
    """Slices (canvas rows, canvas cols, layer rows, layer cols) for an n×n layer centred on pixel (cx, cy)."""
    y0, x0 = cy - n // 2, cx - n // 2
    ys, xs = slice(max(y0, 0), min(y0 + n, size)), slice(max(x0, 0), min(x0 + n, size))
    return ys, xs, slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)


def render_scene(objects, size=64, seed=0, return_layout=False):
    """Render one scene of the given (colour, shape) objects → uint8 [size, size, 3].

    The seed fixes the layout and the floor's brightness; the layout is the same at every size (up to pixel
    rounding). With return_layout=True also returns [{"colour", "shape", "centre": (x, y), "radius"}, ...] in
    pixels (pixel i covers [i, i+1), so a centre is the middle of a pixel); objects' bounding circles never overlap.
    """
    check_objects(objects)
    if size < 8:
        raise UserError(f"image size {size} is too small to draw objects; use 32 or 64")
    rng = np.random.default_rng(seed)
    return _render(objects, size, rng, return_layout)


def _render(objects, size, rng, return_layout=False):
    image = _floor(size) * np.float32(1.0 + rng.uniform(-FLOOR_JITTER, FLOOR_JITTER))  # float32 [size, size, 3]
    placed = []
    for (colour, shape), (x, y, r) in zip(objects, _sample_layout(rng, len(objects))):
        cx, cy = int(x * size), int(y * size)  # the pixel holding the centre
        radius_q = max(1, round(r * size * SUPERSAMPLE))
        sprite = _sprite(colour, shape, radius_q)
        placed.append((colour, shape, cx, cy, radius_q, sprite, _window(size, sprite[0].shape[0], cx, cy)))
    for *_, (_, _, keep_floor), (ys, xs, ly, lx) in placed:  # shadows first: they darken the floor, never an object
        image[ys, xs] *= keep_floor[ly, lx]
    for *_, (premult, keep_behind, _), (ys, xs, ly, lx) in placed:  # "over" compositing, premultiplied
        image[ys, xs] *= keep_behind[ly, lx]
        image[ys, xs] += premult[ly, lx]
    out = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if not return_layout:
        return out
    layout = [dict(colour=c, shape=s, centre=(cx + 0.5, cy + 0.5), radius=rq / SUPERSAMPLE)
              for c, s, cx, cy, rq, *_ in placed]
    return out, layout


def make_dataset(split="train", n=10000, size=64, seed=0):
    """n rendered scenes whose label sets belong to `split` → (uint8 [n, size, size, 3], float32 multi-hot [n, 24]).

    Deterministic from (split, n, size, seed). One random stream draws every label set and layout in turn (a
    fresh generator per scene would cost more than drawing the scene).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 1:
        raise UserError(f"the dataset size must be at least 1, got {n}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.zeros((n, NUM_LABELS), np.float32)
    for i in range(n):
        objects = sample_label_set(rng, split)
        labels[i] = objects_to_multi_hot(objects)
        images[i] = _render(objects, size, rng)
    return images, labels


def render_label_sets(label_sets_, size=64, seed=0):
    """Reference renders of given label sets (e.g. eval_label_sets()) → (uint8 [N, size, size, 3], multi-hot [N, 24])."""
    rng = np.random.default_rng(seed)
    images = np.stack([_render(list(objs), size, rng) for objs in label_sets_])
    return images, np.stack([objects_to_multi_hot(objs) for objs in label_sets_])
