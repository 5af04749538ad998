"""The exact stage of an `AnnSetIndex` search: refining FAISS's keys from the stored sets, and re-ranking the
candidate items with the training similarity.

Both read only the candidates' rows of `StoredSets` (memory-mapped after a load), in place (FAISS's
`fvec_inner_products_by_idx`: no gathered copy), so RAM holds no float32 copy of the keys: a product-quantised
FAISS index ranks `refine · neighbours` keys by their codes, `refine_keys` re-scores them by exact inner products from
the stored elements (or sketches) and keeps the best `neighbours`, as FAISS's `IndexRefineFlat` would from its own
float32 copy. One query's re-rank runs FAISS on every core; a batch's are spread one query a core (`map_queries`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

import numpy as np

from tfemde.serving.ann_store import StoredSets
from tfemde.serving.embeddings import Embeddings
from tfemde.serving.similarity import smooth_chamfer_of_logits


def check_refine(refine, key: str) -> int:
    """`refine` as an int >= 1 (1 for `key="fde"`: no MUVERA encodings are stored); ValueError otherwise."""
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 1 or (
            refine > 1 and key == "fde"):
        raise ValueError(f"refine must be an int >= 1 (1 with key='fde': the index stores no MUVERA encodings); "
                         f"got {refine!r}")
    return int(refine)


def refine_keys(stored: StoredSets, key: str, vectors: np.ndarray, labels: np.ndarray,
                neighbours: int) -> np.ndarray:
    """The best `neighbours` of each row's FAISS `labels` by exact inner product with the stored keys.

    Args:
        stored: the index's items.
        key: `"elements"`, `"elements+sketch"` (label `item · K + k`) or `"sketch"` (label `item`).
        vectors: `[M, Dk]` float32 query keys.
        labels: `[M, L]` int64 FAISS ids (-1: none); ids of items beyond `stored` are dropped.
        neighbours: keys kept per row.

    Returns:
        `[M, min(L, neighbours)]` int64 ids, -1 where a row had fewer valid labels.
    """
    width = min(labels.shape[1], neighbours)
    labels = np.where((labels >= 0) & (labels < stored.num_keys(key)), labels, -1)
    if width == labels.shape[1]:
        return labels
    scores = stored.inner_products(vectors, labels, key)  # -inf at -1: kept last
    best = np.argpartition(-scores, width - 1, axis=1)[:, :width]
    return np.where(np.isfinite(np.take_along_axis(scores, best, axis=1)),
                    np.take_along_axis(labels, best, axis=1), -1)


def rerank(stored: StoredSets, query: Embeddings, rows: np.ndarray, k: int, alpha: float, sketch_weight: float,
           stored_norm: float) -> Tuple[np.ndarray, np.ndarray]:
    """`(rows [k], scores [k])`: the best `k` of the candidate `rows` (sorted) by the exact score, best first.

    The inner products of every query element with every element of every candidate (and of the sketches) are
    read from the stored rows in place (`StoredSets.inner_products`); `stored_norm` bounds the norms of every
    stored element (`StoredSets.max_norm`): the similarity's logit bound without reading the candidates twice.
    """
    (k_a, _), k_b = query.sets.shape[1:], stored.sets[0].shape[1]
    elements = (rows[:, None] * k_b + np.arange(k_b)).reshape(-1)
    logits = stored.inner_products(query.sets[0] * np.float32(alpha), elements, "elements")
    logits = np.ascontiguousarray(logits.reshape(k_a, 1, len(rows), k_b).transpose(0, 1, 3, 2))
    scores = smooth_chamfer_of_logits(logits, alpha, query.set_mask, stored.take(rows, "masks"),
                                      alpha * query.max_norm * stored_norm)[0]
    if sketch_weight != 0.0:
        scores += stored.inner_products(query.sketches * np.float32(sketch_weight / query.sketch_depth),
                                        rows, "sketch")[0]
    top = np.argpartition(-scores, k - 1)[:k] if len(rows) > k else np.arange(len(rows))
    order = top[np.lexsort((rows[top], -scores[top]))]
    return rows[order], scores[order]


def candidate_rows(labels: np.ndarray, owner: np.ndarray, num_queries: int, num_elements: Optional[int],
                   n: int) -> list:
    """`[Q]` sorted unique item rows per query from the FAISS `labels [M, L]` of the query keys owned by
    `owner [M]` (`num_elements`: K of an element key, None for one key per item); rows >= `n` are left out."""
    items = labels if num_elements is None else np.where(labels >= 0, labels // num_elements, -1)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(num_queries + 1))
    out = []
    for q in range(num_queries):
        rows = np.sort(items[order[bounds[q]:bounds[q + 1]]], axis=None)
        rows = rows[(rows >= 0) & (rows < n)]
        out.append(rows[np.concatenate(([True], rows[1:] != rows[:-1]))] if len(rows) else rows)
    return out


_pool: Optional[Tuple[int, ThreadPoolExecutor]] = None  # (workers, pool)
_pool_lock = threading.Lock()


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _faiss_on_one_thread() -> None:
    import faiss  # loaded already: only an AnnSetIndex searches

    faiss.omp_set_num_threads(1)  # OpenMP's thread count is per calling thread: this worker's only


# Candidates a query (on average over a batch) from which the re-ranks go to worker threads: below, handing work to
# a thread costs more than the overlap saves (100K clustered gallery, batch 64, 2 cores: 213 candidates a query
# 0.60 ms in the caller against 0.67 with workers; 976: 1.20 against 0.98; 3,975: 3.08 against 2.69).
WORKER_CANDIDATES = 512


def map_queries(work: Callable[[int], object], candidates: list) -> list:
    """`[work(i) for i in range(len(candidates))]` for queries with `candidates[i]` candidate rows each, spread over
    one worker thread a core (as many as FAISS's OpenMP threads), each running FAISS on its own thread, when they
    have `WORKER_CANDIDATES` or more on average.

    One query at a time, its FAISS calls take every core but its NumPy steps (the Smooth-Chamfer of the logits, the
    top k) one; a worker a query keeps every core busy (1M emoji gallery, batch 64, 2 cores, ~2,450 candidates a
    query: 3.15 against 3.57 ms a query). One query, one OpenMP thread or few candidates run in the calling thread.
    """
    global _pool
    import faiss

    workers, count = faiss.omp_get_max_threads(), len(candidates)
    if count < 2 or workers < 2 or sum(map(len, candidates)) < WORKER_CANDIDATES * count:
        return [work(i) for i in range(count)]
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)  # its queued work still runs
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="tfemde-ann",
                                                 initializer=_faiss_on_one_thread))
        pool = _pool[1]
    return list(pool.map(work, range(count)))
