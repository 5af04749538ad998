"""What the command's parts share: `UserError` (printed as one line by `main`) and the check of a file to write."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error the user can fix from its message alone."""


def out_file(path, option="--out"):
    """`path` as a `Path` for a file to write; one line when it names a folder (or sits under a file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give the path of the file to write")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise UserError(f"{option} {path}: a parent of it exists and is not a folder")
    return path
