"""Class centroids for galleries: one entry per class instead of one per image (Wieczorek et al., ICONIP 2021).

For one-vector heads (`K = 1`) a class is the L2-normalised mean of its members' vectors, normalised after
averaging as centroids-reid does. A set head gives each image K unit elements, and a class can be summarised in
several ways (`METHODS`):

- `"slot_mean"`: the per-slot mean, each slot normalised: the k-th elements of the members averaged (meaningful only
  when slot k means the same thing across images, which learned slot queries may or may not give);
- `"kmeans"`: spherical k-means of all the members' elements into K unit centres (K-means++ seeding, a fixed seed),
  the class keeping the set size of an image;
- `"union"`: every member's elements in one set of `M·K` elements, padded with a mask (exact Chamfer over the
  class's images, the largest entry).

Sketches (T-EMDE histograms) are averaged, a sketch of a set of images being the mean of their sketches, and each
partition's row is L2-normalised again, as the encoders emit them (the training similarity takes row cosines).
NumPy only.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from tfemde.serving.embeddings import Embeddings

METHODS = ("slot_mean", "kmeans", "union")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _spherical_kmeans(points: np.ndarray, k: int, rng, iterations: int = 20) -> np.ndarray:
    """`[k, D]` unit centres of unit `points [P, D]` (k <= P): k-means++ seeding on cosine distance, Lloyd steps."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distance = 1.0 - np.max(points @ np.stack(centres).T, axis=1)
        weights = np.maximum(distance, 0.0)
        total = weights.sum()
        centres.append(points[rng.choice(len(points), p=weights / total) if total > 0 else rng.integers(len(points))])
    centres = np.stack(centres)
    for _ in range(iterations):
        assign = np.argmax(points @ centres.T, axis=1)
        updated = centres.copy()
        for c in range(k):
            members = points[assign == c]
            if len(members):
                updated[c] = _unit(members.sum(axis=0))
        if np.allclose(updated, centres):
            break
        centres = updated
    return centres


def group_centroids(embeddings: Embeddings, groups, method: str = "slot_mean",
                    seed: int = 0) -> Tuple[Embeddings, np.ndarray]:
    """One gallery entry per group from the embeddings of its members.

    Args:
        embeddings: `Embeddings` of N images (`sets [N, K, D]`, optional sketches; set masks are honoured).
        groups: `[N]` the class of each image.
        method: how a set head's class is summarised (`METHODS`); ignored for `K = 1`, where it is the mean.
        seed: seed of the k-means seeding.

    Returns:
        `(centroids, group_ids)`: `Embeddings` of the C classes (in order of first appearance) and their `[C]` ids.

    Example:
        >>> import numpy as np
        >>> x = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]], "float32")
        >>> centroids, ids = group_centroids(Embeddings(x), [7, 7, 3])
        >>> ids.tolist(), np.round(centroids.sets[:, 0].astype(float), 3).tolist()
        ([7, 3], [[0.707, 0.707], [1.0, 0.0]])
    """
    if not isinstance(embeddings, Embeddings):
        raise ValueError(f"embeddings must be tfemde.serving.Embeddings; got {type(embeddings).__name__}")
    groups = np.asarray(groups)
    if groups.shape != (len(embeddings),):
        raise ValueError(f"groups must have shape [N] = ({len(embeddings)},); got shape {groups.shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    sets = np.asarray(embeddings.sets, dtype=np.float32)
    n, k, dim = sets.shape
    mask = np.ones((n, k), bool) if embeddings.set_mask is None else np.asarray(embeddings.set_mask, bool)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first)  # classes in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    label = rank[inverse]
    ids = groups[np.sort(first)]
    classes = len(ids)
    rng = np.random.default_rng(seed)
    out_mask = None
    if k == 1 or method == "slot_mean":
        summed = np.zeros((classes, k, dim), np.float32)
        np.add.at(summed, label, np.where(mask[..., None], sets, 0.0))
        counts = np.zeros((classes, k), np.float32)
        np.add.at(counts, label, mask.astype(np.float32))
        out = _unit(summed)
        out_mask = counts > 0 if not (counts > 0).all() else None
    elif method == "kmeans":
        out = np.zeros((classes, k, dim), np.float32)
        masks = np.zeros((classes, k), bool)
        for c in range(classes):
            points = sets[label == c][mask[label == c]]
            centres = _spherical_kmeans(_unit(points), min(k, len(points)), rng) if len(points) > k else _unit(points)
            out[c, :len(centres)] = centres
            masks[c, :len(centres)] = True
        out_mask = None if masks.all() else masks
    else:
        largest = int(np.bincount(label).max()) * k
        out = np.zeros((classes, largest, dim), np.float32)
        masks = np.zeros((classes, largest), bool)
        for c in range(classes):
            members = np.flatnonzero(label == c)
            elements = sets[members].reshape(-1, dim)
            valid = mask[members].reshape(-1)
            out[c, :len(elements)] = elements
            masks[c, :len(elements)] = valid
        out_mask = None if masks.all() else masks
    sketches = None
    if embeddings.sketches is not None:
        flat = np.asarray(embeddings.sketches, dtype=np.float32)
        sketches = np.zeros((classes, flat.shape[1]), np.float32)
        np.add.at(sketches, label, flat)
        rows = sketches.reshape(classes, embeddings.sketch_depth, -1)
        sketches = _unit(rows).reshape(classes, -1).astype(np.float32)
    return (Embeddings(out.astype(np.float32), sketches=sketches, set_mask=out_mask,
                       sketch_depth=embeddings.sketch_depth if sketches is not None else None), ids)
