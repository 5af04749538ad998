"""SCAN / VSE "precomp" region features: `{split}_ims.npy` `[N, R, F]`, `{split}_caps.txt`, `{split}_ids.txt`.

Feature files are large (COCO train ~17 GB), so they are opened as read-only memory maps and never read whole.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from tfemde.data.dataset import Dataset
from tfemde.data.common import DataWarning, check_split, read_text, stable_ids

# File split name -> Dataset split. `testall` is COCO's 5K test set; `test` is then its first 1K fold.
FILE_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test", "testall": "test"}
# The file each Dataset split prefers when a folder holds several candidates.
PREFERRED = {"train": ("train",), "val": ("dev", "val"), "test": ("testall", "test")}


class StackedRows:
    """Read-only rows of several `[n_i, ...]` arrays (memory maps) stacked along axis 0, without copying them.

    Indexing with an int, a slice or an int array reads only the rows asked for; `np.asarray` reads everything.

    Args:
        parts: arrays with equal trailing shapes and dtypes.

    Example:
        >>> rows = StackedRows([np.zeros((2, 3, 4), np.float32), np.ones((1, 3, 4), np.float32)])
        >>> rows.shape, rows[np.array([2, 0])][:, 0, 0].tolist()
        ((3, 3, 4), [1.0, 0.0])
    """

    def __init__(self, parts):
        self.parts = list(parts)
        tails = {tuple(p.shape[1:]) for p in self.parts}
        dtypes = {np.dtype(p.dtype) for p in self.parts}
        if len(tails) != 1 or len(dtypes) != 1:
            raise ValueError(f"StackedRows parts must share trailing shape and dtype; got shapes "
                             f"{[tuple(p.shape) for p in self.parts]} and dtypes {[str(p.dtype) for p in self.parts]}")
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]),) + tails.pop()
        self.dtype = dtypes.pop()
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} rows")
            part = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.parts[part][(i - self.starts[part],) + rest]
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if rows.dtype == bool or rows.ndim != 1:
            raise IndexError(f"StackedRows takes an int, a slice or a 1-D int array; got {rows.dtype} {rows.shape}")
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(part_of):
            at = np.flatnonzero(part_of == p)
            out[at] = self.parts[p][rows[at] - self.starts[p]]
        return out[(slice(None),) + rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)


def _caption_lines(path) -> list:
    text = read_text(path, "caption file")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    captions = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            raise ValueError(f"{path}: line {number} is an empty caption")
        captions.append(line)
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions


def _open_features(path):
    if not path.is_file():
        raise FileNotFoundError(f"region features {path} not found (precomp folders hold {{split}}_ims.npy next to "
                                f"{{split}}_caps.txt)")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(features, np.ndarray) or features.ndim != 3:
        shape = getattr(features, "shape", None)
        raise ValueError(f"{path}: region features must have shape [images, regions, features]; got shape {shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"{path}: region features must be a float array (float32); got dtype {features.dtype}")
    return features


def _repeats(features, per_image, n_images) -> bool:
    """Whether image rows come in runs of `per_image` equal rows (checked on the first, middle and last image)."""
    for i in sorted({0, n_images // 2, n_images - 1}):
        block = np.asarray(features[i * per_image:(i + 1) * per_image])
        if not (block == block[:1]).all():
            return False
    return True


def _read_file_split(folder, name, per_image):
    """(features, rows [N], captions [M], caption_item [M], item names [N]) of one file split."""
    caps_path, ims_path, ids_path = (folder / f"{name}_{kind}" for kind in ("caps.txt", "ims.npy", "ids.txt"))
    captions = _caption_lines(caps_path)
    features = _open_features(ims_path)
    n_rows, n_caps = len(features), len(captions)
    if n_caps % per_image:
        raise ValueError(f"{caps_path}: {n_caps} captions is not a multiple of {per_image} captions per image")
    n_images = n_caps // per_image
    if n_rows == n_images:
        stride = 1
    elif n_rows == n_caps and per_image > 1:
        if not _repeats(features, per_image, n_images):
            raise ValueError(f"{ims_path}: {n_rows} image rows for {n_caps} captions in {caps_path.name}, but the "
                             f"rows are not runs of {per_image} repeated images; expected one row per image")
        stride = per_image
        warnings.warn(f"{ims_path}: {n_rows} image rows for {n_caps} captions: this release repeats each image "
                      f"{per_image}x; using every {per_image}th row ({n_images} images)", DataWarning, stacklevel=4)
    else:
        raise ValueError(f"{ims_path}: {n_rows} image rows do not match {n_caps} captions in {caps_path.name}; "
                         f"expected {n_images} rows ({per_image} captions per image) or {n_caps} (repeated rows)")
    names = [f"{name}:{i}" for i in range(n_images)]
    if ids_path.is_file():
        ids = [line.strip() for line in read_text(ids_path, "id file").split("\n") if line.strip()]
        if len(ids) == n_rows and stride > 1:
            ids = ids[::stride]
        if len(ids) != n_images:
            raise ValueError(f"{ids_path}: {len(ids)} ids do not match {n_images} images of {ims_path.name}; "
                             f"expected one id per image (or per row)")
        names = ids
    rows = np.arange(n_images, dtype=np.int64) * stride
    return features, rows, captions, np.arange(n_caps, dtype=np.int64) // per_image, names


def read_precomp(folder, split=None, captions_per_image: int = 5) -> Dataset:
    """Read a SCAN/VSE precomp folder of region features and captions as a `Dataset` of kind `"regions"`.

    Per split, `{split}_ims.npy` `[N, R, F]` float (opened with `mmap_mode="r"`, never read whole),
    `{split}_caps.txt` with `captions_per_image` consecutive lines per image (caption c belongs to image
    c // captions_per_image) and optionally `{split}_ids.txt` (item names). Releases whose feature rows repeat each
    image once per caption (rows == captions) are detected, checked and de-duplicated through `region_rows`, with a
    `DataWarning`. File splits map to `train`, `dev`/`val` -> `val` and `testall`/`test` -> `test` (`testall`, COCO's
    5K test set, is preferred; `test` is its first 1K fold). Several splits share one `StackedRows` view.

    Args:
        folder: the precomp folder.
        split: None for every split found, `"train"`, `"val"`, `"test"`, or a file split name (`"dev"`,
            `"testall"`) to read exactly that file.
        captions_per_image: captions per image (5 in every public release).

    Returns:
        A `Dataset` with `regions` (a memory map or `StackedRows`) and `region_rows`.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> np.save(folder / "test_ims.npy", np.zeros((2, 36, 8), np.float32))
        >>> _ = (folder / "test_caps.txt").write_text("".join(f"caption {i}\\n" for i in range(10)))
        >>> ds = read_precomp(folder, split="test")
        >>> ds.kind, ds.num_items, ds.num_captions, ds.region_features([0, 1]).shape
        ('regions', 2, 10, (2, 36, 8))
    """
    folder = Path(folder)
    split = check_split(split, allowed=("dev", "testall"))
    if not folder.is_dir():
        raise FileNotFoundError(f"precomp folder {folder} not found")
    if int(captions_per_image) < 1:
        raise ValueError(f"captions_per_image must be >= 1; got {captions_per_image}")
    found = {p.name.rsplit("_", 1)[0] for pattern in ("*_caps.txt", "*_ims.npy") for p in folder.glob(pattern)}
    unknown = sorted(found - set(FILE_SPLITS))
    if unknown:
        warnings.warn(f"{folder}: ignored files of unknown split names {unknown}; known names are "
                      f"{sorted(FILE_SPLITS)}", DataWarning, stacklevel=3)
    if split in ("dev", "testall"):
        if split not in found:
            raise FileNotFoundError(f"{folder}: no {split}_caps.txt / {split}_ims.npy for split={split!r}")
        chosen = [split]
    else:
        chosen = []
        for target in ("train", "val", "test") if split is None else (split,):
            available = [f for f in PREFERRED[target] if f in found]
            chosen += available[:1]
        if not chosen:
            wanted = "any split" if split is None else f"split={split!r} (files " + \
                " or ".join(f"{f}_caps.txt" for f in PREFERRED[split]) + ")"
            raise FileNotFoundError(f"{folder}: no precomp files for {wanted}; found {sorted(found) or 'none'}")

    parts, rows, captions, caption_item, names, item_split = [], [], [], [], [], []
    row_offset = item_offset = 0
    for name in chosen:
        features, part_rows, part_caps, part_item, part_names = _read_file_split(folder, name,
                                                                                 int(captions_per_image))
        if parts and tuple(features.shape[1:]) != tuple(parts[0].shape[1:]):
            raise ValueError(f"{folder / (name + '_ims.npy')}: region features of shape {tuple(features.shape)} "
                             f"do not stack with {chosen[0]}_ims.npy of shape {tuple(parts[0].shape)}; load the "
                             f"splits separately with split=")
        if parts and features.dtype != parts[0].dtype:
            raise ValueError(f"{folder / (name + '_ims.npy')}: dtype {features.dtype} differs from "
                             f"{chosen[0]}_ims.npy ({parts[0].dtype}); load the splits separately with split=")
        parts.append(features)
        rows.append(part_rows + row_offset)
        captions += part_caps
        caption_item.append(part_item + item_offset)
        names += part_names
        item_split += [FILE_SPLITS[name]] * len(part_rows)
        row_offset += len(features)
        item_offset += len(part_rows)
    # Items share a group only when their ids repeat; without ids every item is its own group.
    return Dataset(name=folder.name, captions=captions, caption_item=np.concatenate(caption_item),
                   item_split=np.array(item_split), item_group=stable_ids(names, b"tfemde-group"),
                   regions=parts[0] if len(parts) == 1 else StackedRows(parts),
                   region_rows=np.concatenate(rows), item_names=np.array(names, dtype=str))
