"""A run folder: its paths, the check that --out may be written, its lock, its log.

    runs/<name>/.tinyddpm-run  marks the folder as a run; the trainer holds an OS lock (flock) on it
    runs/<name>/ckpt.pt        latest checkpoint (atomic; resuming reads it)
    runs/<name>/config.json    the run's config, for people to read
    runs/<name>/log.jsonl      one JSON line per progress report
    runs/<name>/samples/       sample grids, step_0001000.png …

train.py writes only into a new or empty folder or a run folder (the marker, or an older tinyddpm's ckpt.pt; a
config.json alone is not enough: it may be a copy); anything else is refused before a file is touched, and so is a
run folder whose marker, ckpt.pt, config.json or log.jsonl is a symlink, a folder or a FIFO (the run would replace a
link by a file, or block reading a FIFO). One trainer per folder: the marker is locked with flock, which the kernel
drops when the process dies, even by SIGKILL, so a lock is never stale. Under torchrun rank 0 alone takes the lock
and writes; the writing methods do nothing in the other processes.
"""
import contextlib
import glob
import json
import os
import socket
import stat
import sys

import torch

try:
    import fcntl
except ImportError:  # not on Windows: run folders are then not locked
    fcntl = None

from . import distributed as dist
from .checkpoint import CKPT_NAME
from .errors import UserError
from .files import atomic_write_bytes, check_output_dir, file_mode, is_inside

MARKER = ".tinyddpm-run"
MARKER_TEXT = "tinyddpm run folder (train.py); the trainer using it holds an flock on this file"
HOLDER_BYTES = 512  # enough of the marker to read who holds it
GRID_NAME, GRID_GLOB = "step_{:07d}.png", "step_*.png"  # sample grids in samples/, and the pattern of their names


class RunFolder:
    """Paths of one run. Its writing methods do nothing outside the main process (rank 0 writes for everyone)."""

    def __init__(self, out):
        self.out = os.fspath(out)
        self.ckpt, self.marker = os.path.join(self.out, CKPT_NAME), os.path.join(self.out, MARKER)
        self.log, self.config = os.path.join(self.out, "log.jsonl"), os.path.join(self.out, "config.json")
        self.samples = os.path.join(self.out, "samples")

    def check(self, cfg):
        """Everything about --out that can be known without creating it; a UserError, and nothing touched."""
        if os.path.islink(self.out) and not os.path.exists(self.out):
            raise UserError(f"--out {self.out} is a symlink to {os.readlink(self.out)}, which does not exist; "
                            "create its target or choose another --out")
        check_output_dir(self.out)
        path = os.path.abspath(self.out)
        while not os.path.exists(path):  # the nearest folder that exists is where it would be created
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise UserError(f"cannot create run folder {self.out}: {path} is a file; choose another --out")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {path}: permission denied; choose a writable --out folder")
        if cfg.data.dataset == "folder" and is_inside(self.out, cfg.data.data_dir):
            raise UserError(f"--out {self.out} is inside --data-dir {cfg.data.data_dir}, so the run's sample grids "
                            "would become training data; put the run folder somewhere else")
        if os.path.isdir(self.out) and not self.is_run():
            try:
                mine = os.listdir(self.out)
            except OSError as e:
                raise UserError(f"cannot read {self.out}: {e.strerror}; choose another --out") from None
            if mine:
                raise UserError(f"--out {self.out} is a folder with other files in it ({sorted(mine)[0]!r}, …), not "
                                f"a tinyddpm run (no {MARKER}); choose a new or empty folder (nothing was changed)")
        for path in (self.marker, self.ckpt, self.config, self.log):
            self._check_plain_file(path)

    def is_run(self):
        """The marker, or an older tinyddpm's run: its checkpoint (checked when read). A config.json alone is not
        one: a copy of another run's is an ordinary file of the user's."""
        return os.path.lexists(self.marker) or os.path.lexists(self.ckpt)

    @staticmethod
    def _check_plain_file(path):
        """A file the run reads and replaces must be absent or a regular file: a symlink would be replaced by a file
        (its target left behind, or truncated), a FIFO would block the read."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}; choose another --out") from None
        if stat.S_ISREG(mode):
            return
        what = (f"a symlink (to {os.readlink(path)})" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "not a regular file")
        raise UserError(f"{path} is {what}, and train.py reads and replaces this file; move it away (or put the real "
                        f"file in its place) and run again (nothing was changed)")

    def _lock(self):
        """(an open file holding the lock, None), or (None, why it could not be had). Creates the folder."""
        try:
            os.makedirs(self.out, exist_ok=True)
            fd = os.open(self.marker, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as e:
            return None, f"cannot write the run folder {self.out}: {e.strerror}; choose a writable --out"
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, HOLDER_BYTES).decode(errors="replace").strip().splitlines()[-1:]
                os.close(fd)
                return None, (f"another trainer is using {self.out} ({''.join(holder) or 'it holds ' + MARKER}); "
                              "wait for it to finish or stop it, or choose another --out")
            except OSError as e:  # a filesystem without locks (ENOLCK, EOPNOTSUPP): train, but say so
                print(f"warning: cannot lock {self.marker} ({e.strerror}); make sure no other trainer uses "
                      f"{self.out}", file=sys.stderr)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{MARKER_TEXT}\nheld by pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:  # who holds the lock is only information
            pass
        return fd, None

    @contextlib.contextmanager
    def claimed(self, device):
        """Create the folder and hold its lock while the block runs. Rank 0 locks; every process takes its verdict.
        Closing the file drops the lock, and so does the death of the process, however it dies."""
        fd, why = self._lock() if dist.is_main() else (None, None)
        refused = torch.tensor([int(why is not None)], device=device)
        if dist.all_reduce_(refused, "max").item():
            raise UserError(why or f"rank 0 could not lock {self.marker}; see its error")
        try:
            yield self
        finally:
            if fd is not None:
                os.close(fd)

    def remove_stale_temp(self):
        """Delete the temp files of writes that a killed run never finished: files.atomic_write_bytes names them
        .<name>.<random>.tmp, so only those of the run's own files go, never another .tmp of the user's."""
        if not dist.is_main():
            return
        own = (self.ckpt, self.config, self.log, os.path.join(self.samples, GRID_GLOB))
        for path in own:
            pattern = os.path.join(glob.escape(os.path.dirname(path)), f".{os.path.basename(path)}.*.tmp")
            for tmp in glob.glob(pattern):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def discard(self):
        """Remove what a run that never saved a checkpoint wrote (its config, log, grids and marker), so the folder
        is as it was found."""
        if not dist.is_main():
            return
        grids = glob.glob(os.path.join(glob.escape(self.samples), GRID_GLOB))
        for path in (self.config, self.log, *grids, self.marker):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):  # only if empty: a file of the user's stays
            os.rmdir(self.samples)

    def write_config(self, cfg):
        if dist.is_main():
            atomic_write_bytes(self.config, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())

    def trim_log(self, step):
        """Keep only log lines up to `step` (the resumed checkpoint), dropping any half-written last line."""
        if not dist.is_main() or not os.path.lexists(self.log):
            return
        kept = []
        try:
            with open(self.log, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                        kept.append(json.dumps(rec) + "\n")
        except OSError as e:
            raise UserError(f"cannot read {self.log}: {e.strerror}; move it away to start a new log") from None
        atomic_write_bytes(self.log, "".join(kept).encode())

    def append_log(self, record):
        if not dist.is_main():
            return
        try:
            with open(self.log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: the next resume trims a half-written line, the checkpoint is untouched
            raise UserError(f"cannot write {self.log}: {e.strerror}; free some space, then run the same command "
                            "to resume from the last checkpoint") from None

    def grid_path(self, step):
        return os.path.join(self.samples, GRID_NAME.format(step))
