"""Atomic file writes: write to a temporary file in the same folder, fsync, then `os.replace`.

A reader (or a resumed run after SIGKILL) sees either the old file or the complete new one, never half of one.
"""
import contextlib
import hashlib
import io
import os
import tempfile
import urllib.request

from .errors import UserError

DOWNLOAD_CHUNK = 1 << 20  # bytes per read while downloading
NEW_FILE_MODE = 0o666  # what open() asks for; the umask takes its bits away


def file_mode():
    """The mode a plain open() would give a new file now. mkstemp makes 0600 files, but a sample or checkpoint
    should be readable by group members or a web server like any other output. (Reading the umask means setting
    it; the two calls are back to back.)"""
    umask = os.umask(0)
    os.umask(umask)
    return NEW_FILE_MODE & ~umask


def atomic_write_bytes(path, data: bytes):
    """Write `data` to `path` atomically. Raises UserError if the folder cannot be written.

    The temporary file is removed on ANY way out short of os.replace, Ctrl-C and SIGTERM included (run_cli turns
    SIGTERM into SystemExit), so an interrupted run leaves no `.name.*.tmp` behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror}; choose a writable output folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror}; the previous file, if any, is untouched") from None
        raise


def atomic_torch_save(obj, path):
    """torch.save to memory, then write atomically (plain dicts of tensors and Python data only)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(img, path):
    """Save a PIL image atomically; the format follows the file extension."""
    buf = io.BytesIO()
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").upper() or "PNG"
    img.save(buf, format="JPEG" if fmt == "JPG" else fmt)
    atomic_write_bytes(path, buf.getvalue())


def is_inside(path, folder):
    """Whether `path` is `folder` or below it once symlinks are resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(path):
    """Refuse an output path that exists and is not a folder (a user's file must not be replaced)."""
    path = os.fspath(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"output path {path} is a broken symbolic link; remove it or pass another --out")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"output path {path} is a file, not a folder; pass a folder path with --out")
    return path


def unused_folder(base):
    """`base` if it is missing or empty, else the first of base-2, base-3, … that is: a default output folder for
    commands run twice (sample.py without --out), so the second run never writes over the first one's images."""
    path, n = base, 1
    while os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        n += 1
        path = f"{base}-{n}"
    return path


def prepare_output_dir(path):
    """The one way an output folder is made: refuse a file in its place, create it (and its parents), and check
    it can be written. Call it after the cheap checks and before the slow work, so a bad --out fails at once and a
    refused command leaves nothing behind. Returns the path."""
    path = check_output_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {path}: {e.strerror}; choose a writable --out") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to output folder {path}: permission denied; choose a writable --out")
    return path


@contextlib.contextmanager
def removed_if_unused(path):
    """Folders on the way to `path` that the block creates are removed again if it fails and leaves them empty.

    So a mode can make its output folder before the slow work (an uncreatable --out fails at once) and a refusal
    that comes later (an unreadable image, a reference of the wrong size, Ctrl-C) still leaves nothing behind."""
    new, p = [], os.path.abspath(os.fspath(path))
    while not os.path.lexists(p) and os.path.dirname(p) != p:  # the missing folders, deepest first
        new.append(p)
        p = os.path.dirname(p)
    try:
        yield
    except BaseException:
        for folder in new:
            try:
                os.rmdir(folder)  # only if empty; stops at the first one that holds something
            except OSError:
                break
        raise


def download(url, dest, algorithm, check, timeout=60, announce=None):
    """Stream `url` into a temp file beside `dest`, hashing it as it arrives; rename it to `dest` only after
    `check(hexdigest)` returns (it raises for a wrong file). Nothing half-written or wrong is ever left behind.

    Network and disk errors propagate (OSError, ValueError, http.client.HTTPException) for the caller to word;
    `announce()` is called once the connection is open."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", suffix=".part", dir=folder)
    digest = hashlib.new(algorithm, usedforsecurity=False)  # integrity, not security
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            if announce:
                announce()
            for block in iter(lambda: r.read(DOWNLOAD_CHUNK), b""):
                f.write(block)
                digest.update(block)
        check(digest.hexdigest())
        os.chmod(tmp, file_mode())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
