"""`AnnSetIndex`: a FAISS candidate stage over millions of sets, re-ranked with the exact training similarity.

No vector engine computes Smooth-Chamfer, but it stays within ln(K)/α of the symmetric Chamfer score (the mean best
inner product of each element), so the items whose elements are nearest to a query's elements by inner product are
the candidates worth scoring. The index keeps:

- a FAISS inner-product index (`IndexIDMap2` over any `index_factory` string) of candidate keys (`ann_keys`):
  every valid set element with id `item · K + k` (`key="elements"`; `"elements+sketch"` appends the item's sketch),
  one T-EMDE sketch per item with id `item` (`key="sketch"`, EMDE's own use of sketches as retrieval keys), or one
  MUVERA fixed-dimensional encoding per item (`key="fde"`, `tfemde.serving.fde`);
- the items' sets, masks and sketches as arrays (memory-mapped after `load`, float16 optional), read only at the
  candidates' rows when a query is re-ranked with `tfemde.serving.similarity`'s code.

`search` asks FAISS for `neighbours` keys per query element (or sketch; or `refine` times more, of which the exact
stored ones keep `neighbours`) and returns the best `k` of their items by the exact score (`ann_rerank`). `save`
writes the FAISS file, the arrays and a `manifest.json` with sizes and sha256 checksums; `load` refuses a file
that is missing, truncated, changed or does not match the others.

Needs `faiss-cpu` (`pip install "tfemde[ann]"`); `SetIndex` stays the exact index that needs nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from tfemde.files import make_folder_beside, move_folder_into_place
from tfemde.serving.ann_keys import ELEMENT_KEYS, KEYS, item_keys, key_dim, query_keys
from tfemde.serving.ann_rerank import candidate_rows, check_refine, map_queries, refine_keys, rerank
from tfemde.serving.ann_store import (FAISS_FILE, FORMAT_NAME, FORMAT_VERSION, MANIFEST, StoredSets,
                                      check_files, check_replaceable, read_manifest, stored_max_norm)
from tfemde.serving.embeddings import Embeddings
from tfemde.serving.index import check_addable, extend_ids
from tfemde.serving.manifest import file_records
from tfemde.serving.similarity import check_alpha

# MUVERA encodings when key="fde" (tfemde.serving.fde.encode): 2 × 4 × 4 × 32 = 1,024 dimensions per item.
DEFAULT_FDE = {"repetitions": 4, "simhash_bits": 2, "projection": 32, "seed": 0}
STORE_DTYPES = ("float32", "float16")
# Keys per query element asked of FAISS when `neighbours` is not given: on the emoji model's embeddings (100K items,
# benchmarks/ann.py) exact-scan candidates reach recall@10 0.89 with 64, 0.95 with 128, 0.98 with 256, 0.99 with 512.
DEFAULT_NEIGHBOURS = 256
# IVF coarse quantisers are trained on at most this many keys per list (FAISS warns below 39; its own default,
# 256, makes k-means on millions of keys take most of an hour on two cores).
IVF_TRAINING_PER_LIST = 40
# Items whose keys train a new FAISS index (a random sample of a larger first add: 1M element keys at K = 4, more
# than IVF's 40 a list up to 26,000 lists), and items whose keys go to FAISS in one call.
TRAINING_ITEMS = 262_144
ADD_BLOCK_ITEMS = 65_536


def _faiss():
    if "faiss" not in sys.modules:
        # FAISS's OpenMP threads otherwise spin after each search and, on a machine with few cores, take the
        # re-rank's core for a whole scheduler slice: 8 ms instead of 3 a query (benchmarks/ann.py, 2 cores).
        # OpenMP reads this once, when FAISS loads it; a value the user set is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    except ImportError as error:
        raise ImportError("AnnSetIndex needs faiss-cpu: pip install \"tfemde[ann]\" (or faiss-cpu); the exact "
                          "tfemde.serving.SetIndex needs nothing") from error
    return faiss


FACTORY_KINDS = ("auto", "flat", "hnsw", "ivfpq")


def default_factory(num_keys: int, dim: int, kind: str = "auto") -> str:
    """The FAISS factory string of a `kind` of index for `num_keys` vectors of dimension `dim`.

    `"flat"`: exact inner products. `"hnsw"`: a graph with 32 links a node (the best recall per millisecond while
    the float32 keys fit in memory). `"ivfpq"`: 4·√N inverted lists (at least 39 keys each, as FAISS's k-means
    wants) over product-quantised keys of D/4 bytes (1/16 of float32). `"auto"`: flat up to 50,000 keys (a scan
    costs less than a graph), HNSW up to 2M, IVF-PQ beyond.
    """
    if kind not in FACTORY_KINDS:
        raise ValueError(f"kind must be one of {FACTORY_KINDS}; got {kind!r}")
    if kind == "auto":
        kind = "flat" if num_keys <= 50_000 else "hnsw" if num_keys <= 2_000_000 else "ivfpq"
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32"
    nlist = 1 << max(0, int(round(math.log2(4 * math.sqrt(max(num_keys, 1))))))
    while nlist > 1 and num_keys < 39 * nlist:
        nlist //= 2
    m = next(m for m in (dim // 4, dim // 8, dim // 16, 1) if m >= 1 and dim % m == 0)
    return f"IVF{nlist},PQ{m}"


class AnnSetIndex:
    """Approximate top-k search over set embeddings: FAISS finds candidates, the model's similarity ranks them.

    The interface of `SetIndex` (`add`, `search`, `save`, `load`, `len`), for galleries too large to score every
    item: a query costs `K` FAISS searches and an exact re-rank of at most `K · neighbours` items.

    Args:
        alpha: Smooth-Chamfer temperature α (the model's, e.g. `Encoder.similarity_kwargs`).
        sketch_weight: λ of the sketch similarity in the re-rank; 0 ignores sketches.
        key: the candidate keys: `"elements"` (every set element; id `item · K + k`), `"elements+sketch"` (every
            set element with its item's sketch appended, both sides scaled by √(sketch_weight / depth): a key's
            inner product is the element's cosine plus the item's whole sketch term of the score; needs sketches
            and sketch_weight > 0), `"sketch"` (one T-EMDE sketch per item; needs sketches) or `"fde"` (one MUVERA
            encoding per item).
        factory: a FAISS `index_factory` string (`"Flat"`, `"HNSW32"`, `"IVF4096,PQ64"`, `"OPQ64,IVF4096,PQ64"`,
            ...), a kind of `default_factory` (`"flat"`, `"hnsw"`, `"ivfpq"`, sized at the first `add`), or None
            for `"auto"` (chosen from the number of keys at the first `add`). IVF and PQ
            indexes are trained on the first `add`, which must hold enough keys (FAISS wants about 40 per list).
        neighbours: keys retrieved per query element (`k′`); the candidates are the union of their items.
        refine: FAISS retrieves `refine · neighbours` keys per query element and the best `neighbours` of them by
            exact inner products with the stored elements (or sketches) go on: FAISS's `RFlat` without its float32
            copy of the keys, for product-quantised indexes (`"IVF4096,PQ64x4fs"`); 1 uses FAISS's ranking.
        search_params: FAISS search parameters (`faiss.ParameterSpace`; None keeps FAISS's defaults): `efSearch`
            (HNSW), `nprobe` (IVF), `k_factor_rf` (a refined index, e.g. `"IVF4096,PQ64x4fs,RFlat"`: FAISS ranks
            `k_factor_rf · neighbours` keys by their codes and keeps the best `neighbours` by exact inner products).
        store_dtype: `"float32"` or `"float16"` for the stored sets and sketches (half the bytes; the re-rank
            computes in float32).
        fde_options: with `key="fde"`, the arguments of `tfemde.serving.fde.encode` (default `DEFAULT_FDE`).
        export_digest: the digest of the export the embeddings came from (`Encoder.export_digest`), recorded.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import Embeddings
        >>> from tfemde.serving.ann import AnnSetIndex
        >>> x = np.random.default_rng(0).normal(size=(50, 4, 8)).astype("float32")
        >>> items = Embeddings(x / np.linalg.norm(x, axis=-1, keepdims=True))
        >>> index = AnnSetIndex(alpha=16.0, factory="Flat", neighbours=8)
        >>> index.add(items)
        >>> ids, scores = index.search(items[:2], k=3)
        >>> ids.shape, ids[:, 0].tolist()
        ((2, 3), [0, 1])
    """

    def __init__(self, alpha: float = 16.0, sketch_weight: float = 0.0, key: str = "elements",
                 factory: Optional[str] = None, neighbours: int = DEFAULT_NEIGHBOURS,
                 search_params: Optional[dict] = None, store_dtype: str = "float32",
                 export_digest: Optional[str] = None, fde_options: Optional[dict] = None, refine: int = 1):
        self.alpha = check_alpha(alpha)
        self.sketch_weight = float(sketch_weight)
        if not np.isfinite(self.sketch_weight):
            raise ValueError(f"sketch_weight must be finite; got {sketch_weight!r}")
        if key not in KEYS:
            raise ValueError(f"key must be one of {KEYS}; got {key!r}")
        if factory is not None and (not isinstance(factory, str) or not factory.strip()):
            raise ValueError(f"factory must be a FAISS index_factory string (e.g. 'HNSW32') or None; got {factory!r}")
        if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 1:
            raise ValueError(f"neighbours must be an int >= 1; got {neighbours!r}")
        if key == "elements+sketch" and not self.sketch_weight > 0:
            raise ValueError(f"key='elements+sketch' needs sketch_weight > 0 (the weight of the sketch part of its "
                             f"keys); got {sketch_weight!r}")
        self.refine = check_refine(refine, key)
        if search_params is not None and not (isinstance(search_params, dict) and all(
                isinstance(name, str) and isinstance(v, (int, float, np.integer, np.floating)) and
                not isinstance(v, bool) for name, v in search_params.items())):
            raise ValueError(f"search_params must be a dict of FAISS parameter names to numbers, e.g. "
                             f"{{'efSearch': 128}}; got {search_params!r}")
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {STORE_DTYPES}; got {store_dtype!r}")
        if export_digest is not None and not isinstance(export_digest, str):
            raise ValueError(f"export_digest must be a str (Encoder.export_digest) or None; got {export_digest!r}")
        unknown = set(fde_options or {}) - set(DEFAULT_FDE)
        if unknown:
            raise ValueError(f"fde_options takes {sorted(DEFAULT_FDE)}; got {sorted(unknown)}")
        self.fde_options = {**DEFAULT_FDE, **(fde_options or {})}
        self.key = key
        self.factory = factory
        self.neighbours = int(neighbours)
        self.search_params = dict(search_params or {})
        self.store_dtype = store_dtype
        self.export_digest = export_digest
        self._faiss_index = None
        self._applied_params = {}  # what is set on the FAISS index now
        self._faiss_defaults = {}  # FAISS's own value of every parameter a search has changed
        self._rows = StoredSets(store_dtype)
        self._first: Optional[Embeddings] = None  # an item of the index: its K, D and sketch shape
        self._ids: Optional[np.ndarray] = None
        # add() changes the FAISS index, the rows and the ids together; FAISS may not search while it adds.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"AnnSetIndex({len(self)} items, key={self.key!r}, factory={self.factory!r}, "
                f"neighbours={self.neighbours}, alpha={self.alpha}, sketch_weight={self.sketch_weight})")

    @property
    def ids(self) -> np.ndarray:
        """`[N]` the ids of the indexed items, in insertion order (int64, or str)."""
        with self._lock:
            return np.zeros(0, np.int64) if self._ids is None else self._ids

    @property
    def num_keys(self) -> int:
        """The number of vectors in the FAISS index."""
        return 0 if self._faiss_index is None else int(self._faiss_index.ntotal)

    # -- building ------------------------------------------------------------------------------------------------
    def _new_faiss_index(self, embeddings: Embeddings):
        """The FAISS index for the first add's `embeddings`, trained on (a sample of) their keys."""
        faiss = _faiss()
        factory = self.factory or "auto"
        sample = embeddings if len(embeddings) <= TRAINING_ITEMS else embeddings[np.sort(
            np.random.default_rng(0).choice(len(embeddings), TRAINING_ITEMS, replace=False))]
        vectors, _ = item_keys(sample, self.key, 0, self.sketch_weight, self.fde_options)
        if factory in FACTORY_KINDS:
            num_keys = len(embeddings) if self.key not in ELEMENT_KEYS else (
                embeddings.sets.shape[0] * embeddings.num_elements if embeddings.set_mask is None
                else int(embeddings.set_mask.sum()))
            factory = default_factory(num_keys, vectors.shape[1], factory)
        try:
            inner = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(f"factory {factory!r} is not a FAISS index_factory string FAISS can build "
                             f"({str(error).strip().splitlines()[-1]})") from None
        index = faiss.IndexIDMap2(inner)
        try:
            faiss.extract_index_ivf(inner).cp.max_points_per_centroid = IVF_TRAINING_PER_LIST
        except RuntimeError:  # not an IVF index
            pass
        if not index.is_trained:
            try:
                index.train(vectors)
            except RuntimeError as error:
                raise ValueError(f"factory {factory!r} could not be trained on {len(vectors)} keys of the first add "
                                 f"({str(error).strip().splitlines()[-1]}); add more items at once, or choose a "
                                 "smaller IVF/PQ") from None
        self.factory = factory
        return index

    def add(self, embeddings: Embeddings, ids=None) -> None:
        """Add items: their keys go into FAISS (built and trained at the first call), their arrays beside it.

        Args:
            embeddings: `Embeddings` of M items with the K, D and sketch shape of the indexed ones; sketches when
                `sketch_weight != 0` or `key == "sketch"`.
            ids: `[M]` unique ids (ints or strings), or None for consecutive ints from `len(index)`.

        Safe to call while other threads search or save: they see the index before or after this call.
        """
        with self._lock:
            check_addable(embeddings, self._first, self.sketch_weight, "AnnSetIndex")
            if self.key in ("sketch", "elements+sketch") and embeddings.sketches is None:
                raise ValueError(f"this AnnSetIndex has key={self.key!r}, so embeddings need sketches; got none")
            n_old, m = len(self), len(embeddings)
            all_ids = extend_ids(self._ids, ids, n_old, m)
            if m == 0:
                return
            index = self._faiss_index if self._faiss_index is not None else self._new_faiss_index(embeddings)
            try:  # a block of items at a time: their keys may be several times the size of the sets
                for start in range(0, m, ADD_BLOCK_ITEMS):
                    index.add_with_ids(*item_keys(embeddings[start:start + ADD_BLOCK_ITEMS], self.key,
                                                  n_old + start, self.sketch_weight, self.fde_options))
            except BaseException:
                if index is self._faiss_index:  # searches leave out keys beyond the stored items in any case
                    per_item = embeddings.num_elements if self.key in ELEMENT_KEYS else 1
                    try:
                        index.remove_ids(_faiss().IDSelectorRange(n_old * per_item, (n_old + m) * per_item))
                    except RuntimeError:  # (HNSW cannot remove)
                        pass
                raise
            self._faiss_index = index
            self._rows.append(embeddings.sets, embeddings.set_mask, embeddings.sketches, embeddings.max_norm)
            if self._first is None:
                self._first = embeddings[:1]
            self._ids = all_ids

    # -- searching -----------------------------------------------------------------------------------------------
    def _faiss_value(self, name: str):
        """FAISS's current value of `name` (an IVF's nprobe, an HNSW's efSearch, a refine's k_factor_rf), or None."""
        faiss = _faiss()
        inner = faiss.downcast_index(self._faiss_index.index)
        try:
            if name == "k_factor_rf":
                return inner.k_factor if isinstance(inner, faiss.IndexRefine) else None
            if name == "nprobe":
                return faiss.extract_index_ivf(inner).nprobe
            if name == "efSearch":
                while isinstance(inner, faiss.IndexPreTransform):
                    inner = faiss.downcast_index(inner.index)
                return inner.hnsw.efSearch
        except (RuntimeError, AttributeError):
            pass
        return None

    def _set_params(self, overrides: dict) -> None:
        """Set the index's `search_params` with `overrides` on top; what an earlier call overrode goes back."""
        faiss = _faiss()
        for name in overrides:
            if name not in self.search_params and name not in self._faiss_defaults:
                default = self._faiss_value(name)
                if default is None:
                    raise ValueError(f"search_params: {name!r} is not a search parameter of a {self.factory!r} index "
                                     "that a search may change (HNSW takes efSearch, IVF nprobe, a refined index "
                                     "k_factor_rf)")
                self._faiss_defaults[name] = default
        wanted = {**self._faiss_defaults, **self.search_params, **overrides}
        space = faiss.ParameterSpace()
        for name, value in wanted.items():
            if self._applied_params.get(name) == value:
                continue
            try:
                space.set_index_parameter(self._faiss_index, name, value)
            except RuntimeError:
                raise ValueError(f"search_params: {name!r} is not a search parameter of a {self.factory!r} "
                                 "index (HNSW takes efSearch, IVF nprobe, a refined index k_factor_rf)") from None
            self._applied_params[name] = value

    def _candidates(self, queries: Embeddings, neighbours: int, refine: int, params: dict, stored: StoredSets):
        """`[Q]` sorted item rows per query from FAISS (items added after the `stored` snapshot left out)."""
        vectors, owner = query_keys(queries, self.key, self.sketch_weight, self.fde_options)
        with self._lock:
            self._set_params(params)
            _, labels = self._faiss_index.search(np.ascontiguousarray(vectors, np.float32),
                                                 min(neighbours * refine, self.num_keys))
        if refine > 1:
            labels = refine_keys(stored, self.key, vectors, labels, neighbours)
        per_item = self._first.num_elements if self.key in ELEMENT_KEYS else None
        return candidate_rows(labels, owner, len(queries), per_item, len(stored))

    def search(self, queries: Embeddings, k: int = 10, neighbours: Optional[int] = None,
               search_params: Optional[dict] = None, refine: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The best `k` items for every query among FAISS's candidates, by the exact score, best first.

        Args:
            queries: `Embeddings` of Q queries (same D; sketches when `sketch_weight != 0` or `key == "sketch"`).
            k: items per query; more than `len(index)` gives `len(index)`.
            neighbours: keys per query element for this call (default: the index's `neighbours`); a query with
                fewer than `k` candidates is searched again with more, so every row has `k` items.
            search_params: FAISS parameters for this call only, over the index's `search_params` (`nprobe`,
                `efSearch`, or one the index sets).
            refine: the exact refine factor for this call (default: the index's `refine`).

        Returns:
            `(ids [Q, k], scores [Q, k] float32)`, by descending exact score (ties in insertion order).
        """
        if not isinstance(queries, Embeddings):
            raise ValueError(f"queries must be tfemde.serving.Embeddings; got {type(queries).__name__}")
        with self._lock:
            n, item_ids, first, rows_now = len(self), self._ids, self._first, self._rows.snapshot()
        if n == 0:
            raise ValueError("the AnnSetIndex is empty: add() items before search()")
        if queries.dim != first.dim:
            raise ValueError(f"queries must have element dimension D = {first.dim}; got sets of shape "
                             f"{queries.sets.shape}")
        if (self.sketch_weight != 0.0 or self.key == "sketch") and (
                queries.sketches is None or (queries.sketch_dim, queries.sketch_depth) !=
                (first.sketch_dim, first.sketch_depth)):
            raise ValueError(f"queries need sketches of (size, depth) = {(first.sketch_dim, first.sketch_depth)} "
                             f"(sketch_weight={self.sketch_weight}, key={self.key!r}); got "
                             f"{(queries.sketch_dim, queries.sketch_depth)}")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        k = min(k, n)
        neighbours = self.neighbours if neighbours is None else neighbours
        if isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer)) or neighbours < 1:
            raise ValueError(f"neighbours must be an int >= 1; got {neighbours!r}")
        refine, params = self.refine if refine is None else check_refine(refine, self.key), search_params or {}
        candidates = self._candidates(queries, int(neighbours), refine, params, rows_now)

        def best(i):
            rows, wider = candidates[i], int(neighbours)
            while len(rows) < k:  # too few distinct items among the keys: ask for more, up to all of them
                wider = min(wider * 4, self.num_keys)
                rows = self._candidates(queries[i], wider, refine, params, rows_now)[0]
                if wider >= self.num_keys:
                    rows = np.arange(n) if len(rows) < k else rows
                    break
            return rerank(rows_now, queries[i], rows, k, self.alpha, self.sketch_weight, rows_now.max_norm)

        rows, scores = zip(*map_queries(best, candidates)) if len(queries) else ((), ())
        return item_ids[np.array(rows, np.int64).reshape(-1, k)], np.array(scores, np.float32).reshape(-1, k)

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path, store_dtype: Optional[str] = None) -> str:
        """Write the index as one folder: `ann.faiss`, `ids.npy`, `sets.npy` (and `set_mask.npy`, `sketches.npy`)
        and `manifest.json` with the parameters, sizes and sha256 checksums of every file.

        The folder is written beside `path` and moved into place; an existing AnnSetIndex folder at `path` is
        replaced whole, any other existing file or folder is refused.

        Args:
            path: the folder to write.
            store_dtype: `"float32"` or `"float16"` for the written sets and sketches, or None for the index's own
                (`"float16"` from a float32 index: half the folder, without building the FAISS index again).

        Returns:
            the folder written, as a str.
        """
        faiss = _faiss()
        store_dtype = self.store_dtype if store_dtype is None else store_dtype
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {STORE_DTYPES} or None; got {store_dtype!r}")
        path = Path(os.fspath(path))
        check_replaceable(path)
        if not path.parent.is_dir():
            raise ValueError(f"the folder {str(path.parent)!r} for the AnnSetIndex {str(path)!r} does not exist")
        with self._lock:
            if self._faiss_index is None:
                raise ValueError("the AnnSetIndex is empty: add() items before save()")
            tmp = make_folder_beside(path)
            try:
                faiss.write_index(self._faiss_index, str(tmp / FAISS_FILE))
                np.save(tmp / "ids.npy", self._ids, allow_pickle=False)
                self._rows.write(tmp, np.dtype(store_dtype))
                first = self._first
                manifest = {
                    "format": FORMAT_NAME, "version": FORMAT_VERSION,
                    "alpha": self.alpha, "sketch_weight": self.sketch_weight, "key": self.key,
                    "factory": self.factory, "neighbours": self.neighbours, "search_params": self.search_params,
                    "refine": self.refine, "max_norm": self._rows.max_norm,
                    "fde_options": self.fde_options,
                    "store_dtype": store_dtype, "export_digest": self.export_digest,
                    "items": len(self), "keys": self.num_keys, "set_shape": list(first.sets.shape[1:]),
                    "sketch_dim": first.sketch_dim, "sketch_depth": first.sketch_depth,
                    "files": file_records(tmp),
                }
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
                move_folder_into_place(tmp, path, check_replaceable)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return str(path)

    @classmethod
    def load(cls, path, verify: bool = True, mmap: bool = True) -> "AnnSetIndex":
        """Read a folder written by `save`.

        Args:
            path: the folder.
            verify: check every file's sha256 (reads all bytes once); False checks sizes and shapes only.
            mmap: memory-map the sets and sketches (RAM then holds the FAISS index; a query reads its candidates'
                rows from the page cache); False reads them into memory.

        Raises:
            ValueError naming the folder and file when it is not an AnnSetIndex of this format version, or a file
            is missing, truncated, changed or does not match the manifest.
        """
        faiss = _faiss()
        path = Path(os.fspath(path))
        manifest = read_manifest(path)
        files = manifest["files"]
        check_files(path, manifest, verify)
        try:
            arrays = {name[:-4]: np.load(path / name, mmap_mode="r" if mmap else None, allow_pickle=False)
                      for name in files if name.endswith(".npy")}
            faiss_index = faiss.read_index(str(path / FAISS_FILE))
        except Exception as error:
            raise ValueError(f"AnnSetIndex {str(path)!r} holds a file that cannot be read "
                             f"({type(error).__name__}: {error})") from None
        n, (k, d) = manifest["items"], manifest["set_shape"]
        expected = {"ids": (n,), "sets": (n, k, d), "set_mask": (n, k), "sketches": (n, manifest["sketch_dim"])}
        for name, array in arrays.items():
            if name not in expected or array.shape != expected[name]:
                raise ValueError(f"AnnSetIndex {str(path)!r}: {name}.npy has shape {array.shape}, the manifest "
                                 f"says {expected.get(name)}")
            if name in ("sets", "sketches") and array.dtype != np.dtype(manifest["store_dtype"]):
                raise ValueError(f"AnnSetIndex {str(path)!r}: {name}.npy holds {array.dtype}, the manifest says "
                                 f"{manifest['store_dtype']}")
        if faiss_index.ntotal != manifest["keys"] or faiss_index.d != key_dim(
                manifest["key"], d, manifest["sketch_dim"] or 0, manifest["fde_options"]):
            raise ValueError(f"AnnSetIndex {str(path)!r}: {FAISS_FILE} holds {faiss_index.ntotal} keys of dimension "
                             f"{faiss_index.d}, which do not match the manifest")
        index = cls(alpha=manifest["alpha"], sketch_weight=manifest["sketch_weight"], key=manifest["key"],
                    factory=manifest["factory"], neighbours=manifest["neighbours"],
                    search_params=manifest["search_params"], store_dtype=manifest["store_dtype"],
                    export_digest=manifest["export_digest"], fde_options=manifest["fde_options"],
                    refine=manifest.get("refine", 1))
        index._faiss_index = faiss_index
        index._ids = np.asarray(arrays["ids"])
        norm = manifest.get("max_norm")  # (folders written before it was kept: read the sets once)
        norm = stored_max_norm(arrays["sets"], arrays.get("set_mask")) if norm is None else norm
        index._rows.append(arrays["sets"], arrays.get("set_mask"), arrays.get("sketches"), norm)
        first_sketch = None if "sketches" not in arrays else np.asarray(arrays["sketches"][:1], np.float32)
        index._first = Embeddings(np.asarray(arrays["sets"][:1], np.float32), sketches=first_sketch,
                                  sketch_depth=manifest["sketch_depth"])
        return index


def load_index(path):
    """The index at `path`: an `AnnSetIndex` folder, or else a `SetIndex` file (as `tfemde index` writes them).

    Raises ValueError for a missing or damaged index, ImportError for a folder when faiss-cpu is not installed.
    """
    from tfemde.serving.index import SetIndex

    if Path(os.fspath(path)).is_dir():
        return AnnSetIndex.load(path)
    return SetIndex.load(path)
