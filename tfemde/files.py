"""Writing files so that a reader never sees half of one: the standard library only."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TMP_PREFIX = ".tfemde-tmp-"


def atomic_write(path, write):
    """Call `write(tmp_path)`, flush it to disk, and move it onto `path` only once it is complete.

    The temporary file sits beside `path` (same file system, so the move is atomic) and the file gets the mode an
    ordinary `open` would give it under the user's umask (not `mkstemp`'s 0600).
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_folder_beside(path, prefix: str = TMP_PREFIX, suffix: str = "") -> Path:
    """A new empty folder beside `path` (same file system, so it can be moved onto `path`), with the mode an
    ordinary `mkdir` would give it under the user's umask (not `mkdtemp`'s 0700)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def move_folder_into_place(tmp, out_dir, check=None):
    """Move the finished folder `tmp` onto `out_dir`. An existing `out_dir` is checked again with `check(out_dir)`
    (which raises to keep it), swapped out in one rename and then removed, so a reader sees the old or the new."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if out_dir.exists():
        if check is not None:
            check(out_dir)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
