"""Reading user images and writing PNGs and grids. Shared by training data, sampling, fusion and FID.

Tensors in the package are float images in [-1, 1] of shape [B, C, H, W]; files are 8-bit RGB.
"""
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .files import atomic_save_image

# Lower-case extensions we read; matching is case-insensitive ("CAT.JPG" counts).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
GRID_IMAGES = 64  # images in a written sample grid (8 × 8): the first ones, however many were made


def list_images(folder, extensions=IMAGE_EXTENSIONS):
    """All image files below `folder` (recursive), sorted so the order is the same on every machine."""
    if not os.path.exists(folder):
        raise UserError(f"{folder} does not exist; pass an existing folder of images")
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder; pass a folder of images")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(extensions) and not name.startswith("."):
                found.append(os.path.join(dirpath, name))
    return found


def load_rgb(path):
    """Open any image (grayscale, RGBA, palette, 16-bit) as an 8-bit RGB PIL image; UserError names a bad file."""
    try:
        with Image.open(path) as im:
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
