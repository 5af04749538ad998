"""MUVERA fixed-dimensional encodings of sets (Dhulipala et al., 2024): one vector per set whose inner products
approximate the Chamfer similarity, so a single-vector index can propose candidates for set retrieval.

Each of `repetitions` rounds draws `simhash_bits` Gaussian hyperplanes that cut the space into 2^bits partitions and
a random ±1 projection to `projection` dimensions. A query-side block sums the projected elements that fall into each
partition; an item-side block averages them, and an empty partition takes the element whose SimHash code is nearest
in Hamming distance. Then `<query block, item block>` sums, over the query's elements, the inner product with the
mean of the item's elements in the same partition: about `Σ_x max_y <x, y>` when near elements share a partition.

Smooth-Chamfer is symmetric, so `encode(sets, side="item")` is `[item-side, query-side]` and
`encode(sets, side="query")` is `[query-side, item-side]`: their inner product approximates the Chamfer score in both
directions, `Σ_x max_y <x, y> + Σ_y max_x <x, y>`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

SIDES = ("query", "item")


def fde_dim(dim: int, repetitions: int, simhash_bits: int, projection: Optional[int]) -> int:
    """The length of an encoding: 2 directions × repetitions × 2^bits partitions × projected dimension."""
    return 2 * repetitions * (1 << simhash_bits) * (projection or dim)


def _blocks(sets, valid, planes, proj, average):
    """`[N, 2^bits · P]` one round's blocks: per partition the sum (or the mean, empty ones filled) of the projected
    elements."""
    n, k, _ = sets.shape
    bits = planes.shape[1]
    codes = (np.einsum("nkd,db->nkb", sets, planes) > 0) @ (1 << np.arange(bits))  # [N, K]
    x = sets @ proj  # [N, K, P]
    onehot = (codes[..., None] == np.arange(1 << bits)) & valid[..., None]  # [N, K, 2^bits]
    blocks = np.einsum("nkp,nkd->npd", onehot.astype(np.float32), x)
    if average:
        counts = onehot.sum(axis=1)  # [N, 2^bits]
        blocks /= np.maximum(counts, 1)[..., None]
        empty = counts == 0
        if empty.any():
            xor = codes[..., None] ^ np.arange(1 << bits)  # [N, K, 2^bits]
            hamming = np.unpackbits(xor.astype(">u2").view(np.uint8).reshape(n, k, 1 << bits, 2), axis=-1).sum(-1)
            hamming = np.where(valid[..., None], hamming, 1 << 20)
            nearest = hamming.argmin(axis=1)  # [N, 2^bits] the element nearest each partition
            rows, parts = np.nonzero(empty & valid.any(axis=1)[:, None])
            blocks[rows, parts] = x[rows, nearest[rows, parts]]
    return blocks.reshape(n, -1)


def encode(sets: np.ndarray, mask: Optional[np.ndarray] = None, side: str = "item", repetitions: int = 4,
           simhash_bits: int = 2, projection: Optional[int] = 32, seed: int = 0) -> np.ndarray:
    """Symmetric fixed-dimensional encodings of sets.

    Args:
        sets: `[N, K, D]` set elements (normally L2-normalised).
        mask: `[N, K]` bool, False at padded elements, or None.
        side: `"item"` for what is indexed, `"query"` for what searches it.
        repetitions, simhash_bits, projection: MUVERA's R_reps, k_sim and d_proj (None: no projection).
        seed: the draw of hyperplanes and projections; queries and items must share it.

    Returns:
        `[N, fde_dim(D, ...)]` float32.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}; got {side!r}")
    sets = np.asarray(sets, np.float32)
    if sets.ndim != 3:
        raise ValueError(f"sets must have shape [N, K, D]; got {sets.shape}")
    n, k, d = sets.shape
    valid = np.ones((n, k), bool) if mask is None else np.asarray(mask, bool)
    if not (isinstance(simhash_bits, int) and 0 <= simhash_bits <= 12):
        raise ValueError(f"simhash_bits must be an int in [0, 12]; got {simhash_bits!r}")
    rng = np.random.default_rng(seed)
    own, other = [], []
    for _ in range(repetitions):
        planes = rng.normal(size=(d, simhash_bits)).astype(np.float32)
        proj = (np.eye(d, dtype=np.float32) if projection is None else
                (rng.integers(0, 2, size=(d, projection)) * 2 - 1).astype(np.float32) / np.sqrt(projection))
        own.append(_blocks(sets, valid, planes, proj, average=side == "item"))
        other.append(_blocks(sets, valid, planes, proj, average=side == "query"))
    return np.ascontiguousarray(np.concatenate(own + other, axis=1), dtype=np.float32)
