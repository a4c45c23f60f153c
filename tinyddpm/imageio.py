"""Reading user images and writing PNGs and grids. Shared by training data, sampling, fusion and FID.

Tensors in the package are float images in [-1, 1] of shape [B, C, H, W]; files are 8-bit RGB.
"""
import contextlib
import errno
import os
import stat

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .files import atomic_save_image, is_inside

# Lower-case extensions we read; matching is case-insensitive ("CAT.JPG" counts).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
GRID_IMAGES = 64  # images in a written sample grid (8 × 8): the first ones, however many were made


def scan_images(folder):
    """(paths, skipped): the regular image files below `folder`, sorted so every machine sees the same order, and
    [(path, why)] for every entry left out. The one folder scan of training data and FID alike.

    Nothing is opened: a FIFO named x.png would block a decoder forever. Linked folders inside `folder` are searched
    once; a link to a folder outside it (`up -> ..`) is left out, and so is a loop. File names are kept as the OS
    gives them (undecodable bytes as surrogates, which open() accepts). UserError if `folder` is not a folder."""
    if not os.path.exists(folder):
        raise UserError(f"{folder} does not exist; pass an existing folder of images")
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder; pass a folder of images")
    found, skipped, seen = [], [], set()
    unreadable = lambda e: skipped.append((e.filename, f"unreadable folder ({e.strerror})"))  # noqa: E731
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        with contextlib.suppress(OSError):  # a folder removed while we walk: its entries fail on their own
            here = os.stat(dirpath)
            seen.add((here.st_dev, here.st_ino))
        for name in sorted(dirnames):  # a linked folder already walked (a loop, or a second link) is left out
            sub = os.path.join(dirpath, name)
            why = _not_a_folder_to_search(sub, folder, seen)
            if why:
                dirnames.remove(name)
                skipped.append((sub, why))
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            why = _not_an_image(path, name)
            if why:
                skipped.append((path, why))
            else:
                found.append(path)
    return found, skipped


def _not_a_folder_to_search(sub, top, seen):
    """Why the scan of `top` does not enter its subfolder `sub`, or None (then `sub` counts as seen)."""
    if os.path.islink(sub) and not is_inside(sub, top):
        return "symlink to a folder outside the one searched"
    try:
        st = os.stat(sub)
    except OSError as e:
        return f"unreadable link ({e.strerror})"
    if (st.st_dev, st.st_ino) in seen:
        return "symlink loop or second link to a folder already searched"
    seen.add((st.st_dev, st.st_ino))
    return None


def _not_an_image(path, name):
    """Why `path` is not read as an image, or None."""
    if name.startswith("."):
        return "hidden"
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image extension"
    try:
        st = os.stat(path)  # follows symlinks
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        return "dangling symlink" if e.errno == errno.ENOENT and os.path.islink(path) else e.strerror
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def describe_skipped(folder, skipped):
    """One line: how many entries of a folder were left out, and why (one example of each reason)."""
    by_why = {}
    for path, why in skipped:
        by_why.setdefault(why, []).append(path)
    parts = [f"{len(p)} {why} (e.g. {os.path.relpath(p[0], folder)!r})" for why, p in by_why.items()]
    what = "entry that is not an image" if len(skipped) == 1 else "entries that are not images"
    return f"{folder}: left out {len(skipped)} {what}: {'; '.join(parts)}"


def _open_regular(path):
    """`path` opened for reading, refused unless it is a regular file before a byte is read: a plain open() of a
    FIFO waits for a writer forever, so it is opened non-blocking and fstat decides."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # (regular files ignore O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} is not a regular file (a folder, FIFO or device); pass an image file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_rgb(path):
    """Open any image (grayscale, RGBA, palette, 16-bit) as an 8-bit RGB PIL image; UserError names a bad file."""
    try:
        with _open_regular(path) as f, Image.open(f) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: scale to 8 bits instead of letting PIL clip everything above 255.
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # Composite transparency on white rather than on black (what most viewers show).
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path} ({e.__class__.__name__}); remove or replace the file") from None


def resize_center_crop(im, size):
    """Shorter side resized to `size` with LANCZOS, then the centre `size`×`size` square."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def to_tensor(im):
    """PIL RGB → float tensor [3, H, W] in [-1, 1]."""
    import torch

    arr = np.array(im, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x):
    """Float images in [-1, 1] → uint8 (rounded, clipped), same shape and device: the one quantisation to 8 bits."""
    import torch

    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def to_pixels(x):
    """Float images [B, C, H, W] in [-1, 1] → uint8 numpy [B, H, W, C] on the CPU: what make_grid and save_png take."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images_uint8, ncol=None, pad=2, pad_value=255):
    """uint8 [B, H, W, C] → one uint8 [H', W', C] grid image, `ncol` columns (default ≈ √B)."""
    b, h, w, c = images_uint8.shape
    ncol = ncol or max(1, int(np.ceil(np.sqrt(b))))
    nrow = int(np.ceil(b / ncol))
    grid = np.full((pad + nrow * (h + pad), pad + ncol * (w + pad), c), pad_value, np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images_uint8[i]
    return grid


def save_png(array_uint8_hwc, path):
    """Save one uint8 [H, W, C] array as a PNG, atomically."""
    atomic_save_image(Image.fromarray(array_uint8_hwc), path)
