"""The FAISS vectors of an `AnnSetIndex`: what each kind of candidate key is, for items and for queries.

- `"elements"`: every valid set element (id `item · K + k`);
- `"elements+sketch"`: every valid element with its item's sketch appended, both times √(sketch_weight / depth),
  so that a key's inner product is the element's cosine plus the item's whole sketch term of the score (same ids);
- `"sketch"`: one T-EMDE sketch per item (id `item`), EMDE's own use of sketches as retrieval keys;
- `"fde"`: one MUVERA fixed-dimensional encoding per item (id `item`, `tfemde.serving.fde`).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from tfemde.serving import fde
from tfemde.serving.embeddings import Embeddings

KEYS = ("elements", "elements+sketch", "sketch", "fde")
# Keys with one FAISS vector per set element (id `item · K + k`); the others have one per item (id `item`).
ELEMENT_KEYS = ("elements", "elements+sketch")


def key_dim(key: str, dim: int, sketch_dim: int, fde_options: dict) -> int:
    """The dimension of the FAISS vectors of `key` for sets of element dimension `dim`."""
    if key == "elements":
        return dim
    if key == "elements+sketch":
        return dim + sketch_dim
    if key == "sketch":
        return sketch_dim
    return fde.fde_dim(dim, **{name: fde_options[name] for name in ("repetitions", "simhash_bits", "projection")})


def item_keys(embeddings: Embeddings, key: str, first_item: int, sketch_weight: float,
              fde_options: dict) -> Tuple[np.ndarray, np.ndarray]:
    """`(vectors [M', Dk] float32, ids [M'] int64)`: the keys of items numbered from `first_item`."""
    if key not in ELEMENT_KEYS:
        vectors = embeddings.sketches if key == "sketch" else fde.encode(
            embeddings.sets, embeddings.set_mask, "item", **fde_options)
        return vectors, np.arange(first_item, first_item + len(embeddings), dtype=np.int64)
    vectors, index = element_keys(embeddings, key, sketch_weight)
    return vectors, first_item * embeddings.num_elements + index.astype(np.int64)


def query_keys(queries: Embeddings, key: str, sketch_weight: float, fde_options: dict) -> Tuple[np.ndarray, np.ndarray]:
    """`(vectors [M', Dk] float32, owner [M'])`: the keys a search asks FAISS for, and the query each belongs to."""
    if key not in ELEMENT_KEYS:
        vectors = queries.sketches if key == "sketch" else fde.encode(
            queries.sets, queries.set_mask, "query", **fde_options)
        return vectors, np.arange(len(queries))
    vectors, index = element_keys(queries, key, sketch_weight)
    return vectors, index // queries.num_elements


def element_keys(embeddings: Embeddings, key: str, sketch_weight: float) -> Tuple[np.ndarray, np.ndarray]:
    """`(vectors [M', Dk] float32, index [M'])`: the valid elements (`index` into the flattened `[N·K]`), with
    their item's sketch times √(sketch_weight / depth) appended for `key="elements+sketch"`."""
    n, k, d = embeddings.sets.shape
    index = np.arange(n * k) if embeddings.set_mask is None else np.flatnonzero(embeddings.set_mask.reshape(-1))
    if key == "elements":
        return np.ascontiguousarray(embeddings.sets.reshape(-1, d)[index], np.float32), index
    scale = np.float32(np.sqrt(sketch_weight / embeddings.sketch_depth))
    vectors = np.empty((len(index), d + embeddings.sketch_dim), np.float32)
    vectors[:, :d] = embeddings.sets.reshape(-1, d)[index]
    np.multiply(embeddings.sketches[index // k], scale, out=vectors[:, d:])
    return vectors, index
