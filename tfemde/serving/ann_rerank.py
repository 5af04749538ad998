"""The exact stage of an `AnnSetIndex` search: refining FAISS's keys from the stored sets, and re-ranking the
candidate items with the training similarity, a block of rows at a time.

Both read only the candidates' rows of `StoredSets` (memory-mapped after a load), so RAM holds no float32 copy of
the keys: a product-quantised FAISS index ranks `refine · neighbours` keys by their codes, `refine_keys` re-scores
them by exact inner products from the stored elements (or sketches) and keeps the best `neighbours`, as FAISS's
`IndexRefineFlat` would from its own float32 copy.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from tfemde.serving.ann_store import StoredSets
from tfemde.serving.embeddings import Embeddings
from tfemde.serving.similarity import sketch_similarity, smooth_chamfer_checked

# Candidates scored per block: their sets and sketches (4 KiB each at K = 4, D = 256) are gathered and scored while
# they are in the core's cache, instead of gathering all of them and reading them back.
RERANK_BLOCK = 1024


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
        key: `"elements"` (label `item · K + k`) or `"sketch"` (label `item`).
        vectors: `[M, Dk]` float32 query keys.
        labels: `[M, L]` int64 FAISS ids (-1: none); ids of items beyond `stored` are dropped.
        neighbours: keys kept per row.

    Returns:
        `[M, min(L, neighbours)]` int64 ids, -1 where a row had fewer valid labels.
    """
    width = min(labels.shape[1], neighbours)
    out = np.full((len(labels), width), -1, np.int64)
    bound = stored.num_keys(key)
    for m, row in enumerate(labels):
        ids = np.sort(row[(row >= 0) & (row < bound)])  # FAISS returns a key once a query
        if len(ids) > width:
            scores = stored.take_keys(ids, key) @ vectors[m]
            ids = ids[np.argpartition(-scores, width - 1)[:width]]
        out[m, :len(ids)] = ids
    return out


def rerank(stored: StoredSets, query: Embeddings, rows: np.ndarray, k: int, alpha: float, sketch_weight: float,
           stored_norm: float) -> Tuple[np.ndarray, np.ndarray]:
    """`(rows [k], scores [k])`: the best `k` of the candidate `rows` (sorted) by the exact score, best first.

    `stored_norm` bounds the norms of every stored element (`StoredSets.max_norm`): the similarity's logit bound
    without reading the candidates twice.
    """
    use_sketch = sketch_weight != 0.0
    scores = np.zeros((1, len(rows)), np.float32)
    for start in range(0, len(rows), RERANK_BLOCK):
        block = rows[start:start + RERANK_BLOCK]
        out = scores[:, start:start + len(block)]
        if use_sketch:
            sketch_similarity(query.sketches, stored.take(block, "sketches"), query.sketch_depth,
                              weight=sketch_weight, out=out)
        smooth_chamfer_checked(query.sets, stored.take(block, "sets"), alpha, query.set_mask,
                               stored.take(block, "masks"), query.max_norm, stored_norm, None, None, out,
                               use_sketch)
    scores = scores[0]
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
