"""Atomic writes (tinyddpm/files.py): the new file replaces the old in one step and gets the usual permissions."""
import os
import stat

import pytest

from tinyddpm import files
from tinyddpm.errors import UserError


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "a.bin"
    files.atomic_write_bytes(p, b"old")
    files.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.bin"]


def test_written_files_get_the_mode_open_would_give(tmp_path):
    """mkstemp makes 0600 files; outputs must be readable like any other file (0666 minus the umask)."""
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
        p = tmp_path / "atomic"
        files.atomic_write_bytes(p, b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == stat.S_IMODE(os.stat(plain).st_mode) == 0o644


def test_unwritable_folder_is_a_user_error(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(UserError, match="cannot write"):
        files.atomic_write_bytes(f / "x.bin", b"x")  # a file where a folder should be
