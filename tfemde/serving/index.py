"""`SetIndex`: exact top-k search over set embeddings with the training similarity, saved as one checked file."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Optional, Tuple

import numpy as np

from tfemde.files import atomic_write

from tfemde.serving.embeddings import Embeddings
from tfemde.serving.similarity import (check_alpha, check_set_mask, chunk_shape, sketch_similarity,
                                       smooth_chamfer_checked)

FORMAT_NAME = "tfemde.SetIndex"
FORMAT_VERSION = 1
# Items scored per step of a search: bounds the [queries, items] score block (1024 x 32768 float32 = 128 MiB).
_QUERY_BLOCK = 1024
_ITEM_BLOCK = 32768


def _digest(meta: dict, arrays: dict) -> str:
    """sha256 over the metadata (without the digest) and every array's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _write_npz(fileobj, arrays: dict) -> None:
    """Write `arrays` as an uncompressed .npz (no pickles) to an open binary file."""
    np.savez(fileobj, **arrays)


def check_addable(embeddings, first, sketch_weight: float, index_name: str) -> None:
    """Refuse `embeddings` that an index holding items like `first` (None: empty) cannot take."""
    if not isinstance(embeddings, Embeddings):
        raise ValueError(f"embeddings must be tfemde.serving.Embeddings; got {type(embeddings).__name__}")
    if sketch_weight != 0.0 and embeddings.sketches is None:
        raise ValueError(f"this {index_name} has sketch_weight={sketch_weight}, so embeddings need sketches; got none")
    if first is None:
        return
    if embeddings.sets.shape[1:] != first.sets.shape[1:]:
        raise ValueError(f"embeddings must have sets [M, K, D] with [K, D] = {first.sets.shape[1:]} like the "
                         f"indexed items; got sets of shape {embeddings.sets.shape}")
    if (embeddings.sketch_dim, embeddings.sketch_depth) != (first.sketch_dim, first.sketch_depth):
        raise ValueError(f"embeddings must have the indexed items' (sketch size, depth) = "
                         f"{(first.sketch_dim, first.sketch_depth)}; got "
                         f"{(embeddings.sketch_dim, embeddings.sketch_depth)}")


def extend_ids(old_ids: Optional[np.ndarray], ids, n_old: int, m: int) -> np.ndarray:
    """`[n_old + m]` the indexed ids followed by the new items' (`ids`, or consecutive ints from `n_old`), checked.

    Raises ValueError for ids of the wrong shape or kind, a mix of int and string ids, or a repeated id.
    """
    if ids is None:
        if old_ids is not None and old_ids.dtype.kind != "i":
            raise ValueError("ids are required: the index already holds string ids")
        new_ids = np.arange(n_old, n_old + m, dtype=np.int64)
    else:
        new_ids = np.asarray(ids)
        if new_ids.shape != (m,):
            raise ValueError(f"ids must have shape [M] = ({m},) to match embeddings; got shape {new_ids.shape}")
        if new_ids.dtype.kind in "iu":
            new_ids = new_ids.astype(np.int64)
        elif new_ids.dtype.kind in "OUS":
            if new_ids.dtype.kind == "O" and not all(isinstance(i, str) for i in new_ids.tolist()):
                raise ValueError("ids must be all ints or all strings")
            new_ids = new_ids.astype(str)
        else:
            raise ValueError(f"ids must be ints or strings; got dtype {new_ids.dtype}")
        if old_ids is not None and len(old_ids) and m and (new_ids.dtype.kind == "i") != (old_ids.dtype.kind == "i"):
            raise ValueError(f"ids must be of the same kind as the indexed ids ({old_ids.dtype}); got "
                             f"{new_ids.dtype}")
    if old_ids is None or not len(old_ids):
        all_ids = new_ids
    else:
        all_ids = np.concatenate([old_ids, new_ids])
    uniq, counts = np.unique(all_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids must be unique; repeated: {uniq[counts > 1][:5].tolist()}")
    return all_ids


class SetIndex:
    """Exact nearest-neighbour search over set embeddings, scored with the model's own similarity.

    Scores are `similarity(query, item, alpha, sketch_weight)` (Smooth-Chamfer + λ·sketch cosine), computed in
    chunks; top-k uses `argpartition`, so a search costs one pass of matrix multiplies over the index.

    Args:
        alpha: Smooth-Chamfer temperature α (use the model's, e.g. from the export manifest).
        sketch_weight: λ, the sketch similarity weight; 0 ignores sketches.
        chunk_size: items per similarity chunk, see `tfemde.serving.smooth_chamfer`.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import Embeddings, SetIndex
        >>> x = np.random.default_rng(0).normal(size=(5, 4, 8)).astype("float32")
        >>> items = Embeddings(x / np.linalg.norm(x, axis=-1, keepdims=True))
        >>> index = SetIndex(alpha=16.0)
        >>> index.add(items, ids=["a", "b", "c", "d", "e"])
        >>> ids, scores = index.search(items[:2], k=3)
        >>> ids.shape, ids[:, 0].tolist()
        ((2, 3), ['a', 'b'])
    """

    def __init__(self, alpha: float = 16.0, sketch_weight: float = 0.0, chunk_size=None,
                 export_digest: Optional[str] = None):
        self.alpha = check_alpha(alpha)
        if export_digest is not None and not isinstance(export_digest, str):
            raise ValueError(f"export_digest must be a str (Encoder.export_digest) or None; got {export_digest!r}")
        self.export_digest = export_digest
        self.sketch_weight = float(sketch_weight)
        if not np.isfinite(self.sketch_weight):
            raise ValueError(f"sketch_weight must be finite; got {sketch_weight!r}")
        chunk_shape(chunk_size, 1, 1)  # validates
        self.chunk_size = None if chunk_size is None else (
            int(chunk_size) if isinstance(chunk_size, (int, np.integer)) else tuple(int(c) for c in chunk_size))
        self._parts = []
        self._id_parts = []
        self._items: Optional[Embeddings] = None
        self._ids: Optional[np.ndarray] = None
        # add() and the lazy concatenations change several fields together; search() and save() read a snapshot.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._parts)

    def __repr__(self) -> str:
        return f"SetIndex({len(self)} items, alpha={self.alpha}, sketch_weight={self.sketch_weight})"

    @property
    def embeddings(self) -> Optional[Embeddings]:
        """All indexed items as one `Embeddings` (None while empty)."""
        with self._lock:
            if self._items is None and self._parts:
                self._items = Embeddings.concat(self._parts)
                self._parts = [self._items]
            return self._items

    @property
    def ids(self) -> np.ndarray:
        """`[N]` the ids of the indexed items, in insertion order (int64, or str)."""
        with self._lock:
            if self._ids is None:
                self._ids = np.concatenate(self._id_parts) if self._id_parts else np.zeros(0, np.int64)
                self._id_parts = [self._ids] if self._id_parts else []
            return self._ids

    def add(self, embeddings: Embeddings, ids=None) -> None:
        """Add items to the index.

        Args:
            embeddings: `Embeddings` of M items, with the same K, D (and sketch size/depth) as the items already
                indexed, and sketches when `sketch_weight != 0`.
            ids: `[M]` unique ids (ints or strings), or None for consecutive ints from `len(index)`.

        Safe to call while other threads search or save: they see the index before or after this call, whole.
        """
        with self._lock:
            self._add(embeddings, ids)

    def _add(self, embeddings: Embeddings, ids) -> None:
        check_addable(embeddings, self._parts[0] if self._parts else None, self.sketch_weight, "SetIndex")
        all_ids = extend_ids(self.ids if self._id_parts else None, ids, len(self), len(embeddings))
        if len(embeddings) == 0:
            return
        self._parts.append(embeddings)
        self._id_parts = [all_ids]
        self._ids = all_ids
        self._items = None

    def search(self, queries: Embeddings, k: int = 10) -> Tuple[np.ndarray, np.ndarray]:
        """The k best indexed items for every query, best first.

        Args:
            queries: `Embeddings` of Q query items (same D; sketches when `sketch_weight != 0`).
            k: how many items per query; more than `len(index)` gives `len(index)`.

        Returns:
            `(ids [Q, k], scores [Q, k] float32)`, sorted by descending score; equal scores keep insertion order
            (which of several items tied at the k-th score is returned is not specified).
        """
        if not isinstance(queries, Embeddings):
            raise ValueError(f"queries must be tfemde.serving.Embeddings; got {type(queries).__name__}")
        with self._lock:  # one consistent snapshot: items added meanwhile are not half seen
            items, item_ids = self.embeddings, self.ids
        if items is None:
            raise ValueError("the SetIndex is empty: add() items before search()")
        if queries.dim != items.dim:
            raise ValueError(f"queries must have element dimension D = {items.dim}; got sets of shape "
                             f"{queries.sets.shape}")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        use_sketch = self.sketch_weight != 0.0
        if use_sketch and (queries.sketches is None or
                           (queries.sketch_dim, queries.sketch_depth) != (items.sketch_dim, items.sketch_depth)):
            raise ValueError(f"queries need sketches of (size, depth) = {(items.sketch_dim, items.sketch_depth)} "
                             f"(sketch_weight={self.sketch_weight}); got "
                             f"{(queries.sketch_dim, queries.sketch_depth)}")
        n, q = len(items), len(queries)
        k = min(k, n)
        q_mask = check_set_mask(queries.set_mask, queries.sets, "queries.set_mask", "queries.sets")
        i_mask = check_set_mask(items.set_mask, items.sets, "set_mask", "sets")
        out_pos = np.empty((q, k), np.int64)
        out_scores = np.empty((q, k), np.float32)
        for q0 in range(0, q, _QUERY_BLOCK):
            q1 = min(q0 + _QUERY_BLOCK, q)
            best_s = best_p = None
            for j0 in range(0, n, _ITEM_BLOCK):
                j1 = min(j0 + _ITEM_BLOCK, n)
                s = np.empty((q1 - q0, j1 - j0), np.float32)
                if use_sketch:
                    sketch_similarity(queries.sketches[q0:q1], items.sketches[j0:j1], items.sketch_depth,
                                      weight=self.sketch_weight, out=s)
                smooth_chamfer_checked(queries.sets[q0:q1], items.sets[j0:j1], self.alpha,
                                None if q_mask is None else q_mask[q0:q1], None if i_mask is None else i_mask[j0:j1],
                                queries.max_norm, items.max_norm, self.chunk_size, None, s, use_sketch)
                pos = np.broadcast_to(np.arange(j0, j1), s.shape)
                if best_s is not None:
                    s = np.concatenate([best_s, s], axis=1)
                    pos = np.concatenate([best_p, pos], axis=1)
                if s.shape[1] > k:
                    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
                    s = np.take_along_axis(s, top, axis=1)
                    pos = np.take_along_axis(pos, top, axis=1)
                best_s, best_p = s, pos
            order = np.lexsort((best_p, -best_s), axis=-1)
            out_scores[q0:q1] = np.take_along_axis(best_s, order, axis=1)
            out_pos[q0:q1] = np.take_along_axis(best_p, order, axis=1)
        return item_ids[out_pos], out_scores

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path) -> str:
        """Write the index to one `.npz` file (no pickles) with a format version and a sha256 of its contents.

        The file is written to a temporary file in the same folder and moved into place, so `path` is either the
        complete new index or left as it was.

        Args:
            path: the file to write, e.g. `"index.npz"` (used as given; no suffix is added).

        Returns:
            the path written, as a str.
        """
        path = os.fspath(path)
        with self._lock:
            items, ids = self.embeddings, self.ids
        arrays = {"ids": ids}
        if items is not None:
            arrays["sets"] = items.sets
            if items.sketches is not None:
                arrays["sketches"] = items.sketches
            if items.set_mask is not None:
                arrays["set_mask"] = items.set_mask
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "alpha": self.alpha,
            "sketch_weight": self.sketch_weight,
            "chunk_size": self.chunk_size,
            "sketch_depth": None if items is None else items.sketch_depth,
            "export_digest": self.export_digest,
            "arrays": sorted(arrays),
        }
        meta["sha256"] = _digest(meta, arrays)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        def write(tmp):
            with open(tmp, "wb") as f:
                _write_npz(f, arrays)

        atomic_write(path, write)
        return path

    @classmethod
    def load(cls, path) -> "SetIndex":
        """Read an index written by `save`, verifying its format, version and sha256.

        Raises:
            ValueError naming the file if it is not a SetIndex file, has another format version, or is corrupt,
            truncated or changed (the checksum does not match).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"SetIndex file {path!r} does not exist")
        try:
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
                if "meta" not in z.files:
                    raise ValueError("no 'meta' entry")
                meta = json.loads(bytes(z["meta"]).decode())
                if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
                    raise ValueError(f"not a {FORMAT_NAME} file")
                arrays = None
                if meta.get("version") == FORMAT_VERSION:
                    arrays = {name: z[name] for name in meta["arrays"]}
        except Exception as e:  # BadZipFile, zlib, EOF, JSON, missing entries, ... from a damaged file
            raise ValueError(f"SetIndex file {path!r} is corrupt, truncated or not a SetIndex file "
                             f"({type(e).__name__}: {e})") from e
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"SetIndex file {path!r} has format version {meta.get('version')!r}; this tfemde reads "
                             f"version {FORMAT_VERSION}")
        if _digest(meta, arrays) != meta.get("sha256"):
            raise ValueError(f"SetIndex file {path!r} is corrupt or was changed: its sha256 checksum does not match")
        try:
            index = cls(alpha=meta["alpha"], sketch_weight=meta["sketch_weight"], chunk_size=meta["chunk_size"],
                        export_digest=meta.get("export_digest"))
            if "sets" in arrays:
                index.add(Embeddings(arrays["sets"], sketches=arrays.get("sketches"),
                                     set_mask=arrays.get("set_mask"), sketch_depth=meta["sketch_depth"]),
                          ids=arrays["ids"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"SetIndex file {path!r} holds an invalid index: {e}") from e
        return index
