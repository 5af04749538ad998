"""How an `AnnSetIndex` keeps its items: their arrays in parts (added arrays, memory maps) read by candidate row,
and its folder format (the manifest, its checks, and what a save may replace)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from tfemde.serving.ann_keys import ELEMENT_KEYS
from tfemde.serving.embeddings import max_element_norm
from tfemde.serving.manifest import sha256_file

FORMAT_NAME = "tfemde.AnnSetIndex"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAISS_FILE = "ann.faiss"


class StoredSets:
    """The indexed items' sets, masks and sketches, kept as parts (memory maps, added arrays) and read by row."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.sets, self.masks, self.sketches = [], [], []
        self.norms = []  # the largest valid element norm of each part
        self.offsets = [0]

    def __len__(self) -> int:
        return self.offsets[-1]

    def append(self, sets, mask, sketches, max_norm: float) -> None:
        self.norms.append(float(max_norm))
        self.sets.append(self._contiguous(sets))
        self.masks.append(mask)
        self.sketches.append(None if sketches is None else self._contiguous(sketches))
        self.offsets.append(self.offsets[-1] + len(sets))

    def _contiguous(self, array: np.ndarray) -> np.ndarray:
        """`array` (a memory map stays one) as C-contiguous `dtype`: searches read its rows in place."""
        return array if array.dtype == self.dtype and array.flags.c_contiguous else np.ascontiguousarray(
            array, self.dtype)

    def snapshot(self) -> "StoredSets":
        """A copy of the part lists: rows added later do not change it."""
        copy = StoredSets(self.dtype)
        copy.sets, copy.masks, copy.sketches, copy.offsets = (list(self.sets), list(self.masks), list(self.sketches),
                                                              list(self.offsets))
        copy.norms = list(self.norms)
        return copy

    @property
    def max_norm(self) -> float:
        """The largest norm of a valid stored element: a bound of the similarity's logits for any candidates."""
        return max(self.norms, default=0.0)

    def num_keys(self, key: str) -> int:
        """The id bound of the FAISS keys of the stored items: `N · K` for element keys, `N` for `"sketch"`."""
        return len(self) * (self.sets[0].shape[1] if key in ELEMENT_KEYS and self.sets else 1)

    def inner_products(self, vectors: np.ndarray, ids: np.ndarray, key: str) -> np.ndarray:
        """`[M, L]` float32 `<vectors[m], stored key ids[m, l]>` (`ids[l]` for 1-D ids), -inf where an id is < 0.

        Args:
            vectors: `[M, Dk]` float32 query keys.
            ids: `[M, L]` int64 key ids per vector, or `[L]` the same for every vector (a re-rank): element
                `item · K + k` (`key="elements"`, `"elements+sketch"`) or `item` (`"sketch"`), each below
                `num_keys(key)`, or -1.
            key: `"elements"`, `"sketch"`, or `"elements+sketch"` (vectors `[M, D + S]`: the element's and the
                item's sketch's inner products added).

        float32 parts are read in place by FAISS on every core (no gathered copy of the rows); float16 parts are
        gathered and converted, once for 1-D ids, else a row of `ids` at a time.
        """
        if key == "elements+sketch":
            k, d = self.sets[0].shape[1:]
            return (self.inner_products(vectors[:, :d], ids, "elements") +
                    self.inner_products(vectors[:, d:], np.where(ids >= 0, ids // k, -1), "sketch"))
        out = np.full((len(vectors), ids.shape[-1]), -np.inf, np.float32)
        per_key = self.sets[0].shape[1] if key == "elements" else 1
        for p in range(len(self.sets)):
            table = self.sketches[p] if key == "sketch" else self.sets[p].reshape(-1, self.sets[p].shape[2])
            local = ids - self.offsets[p] * per_key
            inside = (ids >= 0) & (local < len(table)) & (local >= 0)
            if not inside.any():
                continue
            if table.dtype == np.float32:
                got = _dot_by_id(table, vectors, np.where(inside, local, -1))
                out[..., inside] = got[..., inside]
            elif ids.ndim == 1:
                out[:, inside] = vectors @ table[local[inside]].astype(np.float32).T
            else:
                for m in np.flatnonzero(inside.any(axis=1)):
                    out[m, inside[m]] = table[local[m, inside[m]]].astype(np.float32) @ vectors[m]
        return out

    @property
    def has_mask(self) -> bool:
        return any(m is not None for m in self.masks)

    def take(self, rows: np.ndarray, column: str) -> Optional[np.ndarray]:
        """`column` ("sets" [R, K, D] float32, "masks" [R, K] bool or None, "sketches" [R, S] float32) at sorted
        `rows`, one fancy index a part.

        Gather one column, use it and drop it before the next: two such blocks alive at once (4 MB each for 1,024
        candidates) push glibc to map fresh pages for the second at every query, several times the copy's cost.
        """
        if column == "masks" and not self.has_mask:
            return None
        parts = getattr(self, column)
        bounds = np.searchsorted(rows, self.offsets)
        pieces = [(p, rows[bounds[p]:bounds[p + 1]] - self.offsets[p]) for p in range(len(parts))
                  if bounds[p] < bounds[p + 1]] or [(0, rows[:0])]
        k = self.sets[0].shape[1]
        got = [parts[p][local] if parts[p] is not None else np.ones((len(local), k), bool) for p, local in pieces]
        out = got[0] if len(got) == 1 else np.concatenate(got)
        return out if column == "masks" else out.astype(np.float32, copy=False)

    def write(self, folder: Path, dtype: Optional[np.dtype] = None) -> list:
        """Write `sets.npy`, `set_mask.npy` (when any part has one) and `sketches.npy` (when sketched) a part at a
        time, sets and sketches as `dtype` (default: the stored one); returns the names written."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        names = ["sets.npy"]
        n, (k, d) = len(self), self.sets[0].shape[1:]
        columns = [("sets.npy", self.sets, (n, k, d), dtype)]
        if self.has_mask:
            names.append("set_mask.npy")
            columns.append(("set_mask.npy", [m if m is not None else np.ones(s.shape[:2], bool)
                                             for m, s in zip(self.masks, self.sets)], (n, k), np.dtype(bool)))
        if self.sketches[0] is not None:
            names.append("sketches.npy")
            columns.append(("sketches.npy", self.sketches, (n, self.sketches[0].shape[1]), dtype))
        for name, parts, shape, column_dtype in columns:
            out = np.lib.format.open_memmap(folder / name, mode="w+", dtype=column_dtype, shape=shape)
            for p, part in enumerate(parts):
                out[self.offsets[p]:self.offsets[p + 1]] = part
            out.flush()
            del out
        return names


# Ids per row of FAISS's loop when every vector shares them: 512 rows of 1 KiB (K = 4, D = 256) are read once from
# memory and again from the core's cache for each further vector (2.4 ms against 3.3 for all ids in one row, 6,300
# candidates of the 1M emoji gallery, 2 cores).
SHARED_IDS_BLOCK = 512


def _dot_by_id(table: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`[M, L]` float32 `<vectors[m], table[ids[m, l]]>` (`ids[l]` for 1-D ids; -inf at -1), by FAISS's
    `fvec_inner_products_by_idx`.

    FAISS runs one OpenMP thread per row of its id matrix. 1-D ids are cut into blocks, each block a row per
    vector, so a core reads a block's rows once for all vectors; 2-D ids with fewer rows than threads are cut into
    column pieces (the vector repeated), so that every core reads its share of the rows.
    """
    import faiss  # loaded already: only an AnnSetIndex, which needs FAISS, stores sets

    m, width = len(vectors), ids.shape[-1]
    if ids.ndim == 1:
        blocks = -(-width // SHARED_IDS_BLOCK)
        padded = np.full(blocks * SHARED_IDS_BLOCK, -1, np.int64)
        padded[:width] = ids
        rows = np.repeat(padded.reshape(blocks, 1, SHARED_IDS_BLOCK), m, axis=1).reshape(blocks * m, -1)
        got = _faiss_dot(faiss, table, np.tile(vectors, (blocks, 1)), rows)
        return got.reshape(blocks, m, -1).transpose(1, 0, 2).reshape(m, -1)[:, :width]
    pieces = max(1, min(width, -(-faiss.omp_get_max_threads() // m)))
    if pieces > 1:
        step = -(-width // pieces)
        split = np.full((m, pieces * step), -1, np.int64)
        split[:, :width] = ids
        ids, vectors = split.reshape(m * pieces, step), np.repeat(vectors, pieces, axis=0)
    return _faiss_dot(faiss, table, vectors, ids).reshape(m, -1)[:, :width]


def _faiss_dot(faiss, table: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(ids, np.int64)
    vectors = np.ascontiguousarray(vectors, np.float32)
    table = np.ascontiguousarray(table)
    out = np.empty(ids.shape, np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(vectors), faiss.swig_ptr(table),
                                     faiss.swig_ptr(ids), table.shape[1], len(vectors), ids.shape[1])
    return out


def stored_max_norm(sets: np.ndarray, mask: Optional[np.ndarray], block: int = 65536) -> float:
    """`max_element_norm` of stored (possibly memory-mapped, float16) sets, a block of rows at a time."""
    return max((max_element_norm(np.asarray(sets[i:i + block], np.float32), None if mask is None else
                                 np.asarray(mask[i:i + block])) for i in range(0, len(sets), block)), default=0.0)


def read_manifest(path: Path) -> dict:
    """The checked manifest of the AnnSetIndex folder `path`; ValueError naming the folder otherwise."""
    if not path.is_dir():
        raise ValueError(f"AnnSetIndex folder {str(path)!r} does not exist")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not an AnnSetIndex folder: its {MANIFEST} is missing or corrupt "
                         f"({type(error).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(path)!r} is not an AnnSetIndex folder ({MANIFEST} is not a {FORMAT_NAME} manifest)")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"AnnSetIndex {str(path)!r} has format version {manifest.get('version')!r}; this tfemde "
                         f"reads version {FORMAT_VERSION}")
    if not isinstance(manifest.get("files"), dict) or FAISS_FILE not in manifest["files"]:
        raise ValueError(f"AnnSetIndex {str(path)!r}: its {MANIFEST} lists no {FAISS_FILE}")
    return manifest


def check_replaceable(path) -> None:
    """Refuse to write over anything at `path` but an empty folder or an AnnSetIndex folder holding only its
    manifest's files (`save` checks this; callers may check before long work)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a folder; choose another path for the AnnSetIndex")
    if not any(path.iterdir()):
        return
    manifest = read_manifest(path)  # raises for a folder that is not an index
    extra = sorted(p.name for p in path.iterdir() if p.name not in set(manifest["files"]) | {MANIFEST})
    if extra:
        raise ValueError(f"{str(path)!r} holds files that are not the AnnSetIndex's ({extra[:3]}); it is not "
                         "replaced. Choose another path")


def check_files(path: Path, manifest: dict, verify: bool) -> None:
    """Every file the manifest lists is there, of its size and (with `verify`) of its sha256."""
    for name, record in manifest["files"].items():
        file = path / name
        if "/" in name or not file.is_file():
            raise ValueError(f"AnnSetIndex {str(path)!r}: file {name!r} listed in {MANIFEST} is missing")
        size = os.path.getsize(file)
        if size != record.get("bytes"):
            raise ValueError(f"AnnSetIndex {str(path)!r}: file {name!r} is truncated or changed ({size} bytes, "
                             f"the manifest says {record.get('bytes')})")
        if verify and sha256_file(file) != record.get("sha256"):
            raise ValueError(f"AnnSetIndex {str(path)!r}: file {name!r} is corrupt or was changed: its sha256 "
                             "checksum does not match the manifest")
