"""What every reader of `tfemde.data` shares: the warning class, split names, stable ids and UTF-8 text files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np

from tfemde.data.dataset import SPLITS

# Split names found in files, mapped to Dataset splits (Karpathy's `restval` is training data).
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}


class DataWarning(UserWarning):
    """Something in the input data was skipped or reinterpreted (missing images, repeated region rows)."""


def stable_hash(key, person: bytes = b"tfemde-item") -> int:
    """A 63-bit BLAKE2b hash of `str(key)` that depends only on the key (and on `person`, the hash's purpose)."""
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def stable_ids(keys, person: bytes = b"tfemde-item") -> np.ndarray:
    """`[N]` int64 ids that depend only on each key string (63-bit BLAKE2b), equal keys giving equal ids."""
    return np.array([stable_hash(k, person) for k in keys], dtype=np.int64)


def read_text(path, what: str) -> str:
    """The UTF-8 text of `path` (a leading BOM is dropped); errors name the file, line and byte."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: {what} must be UTF-8 text; line {line} has invalid byte "
                         f"0x{data[e.start]:02x} at offset {e.start}") from None
    return text[1:] if text.startswith("\ufeff") else text


def check_split(split, allowed=()) -> Optional[str]:
    """Validates the `split` argument: None, a Dataset split, or one of `allowed` (file-specific names)."""
    if split is None or split in SPLITS or split in allowed:
        return split
    names = ", ".join(repr(s) for s in tuple(SPLITS) + tuple(allowed))
    raise ValueError(f"split must be None or one of {names}; got {split!r}")
