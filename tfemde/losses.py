"""Retrieval losses (ALGORITHMS.md §1.3, §3.4, §9); the similarities they take live in `tfemde.similarity`.

Pure `keras.ops`. Every function casts its inputs to float32 and computes in float32, so it is safe under
`mixed_float16` (exp(16) overflows float16; the log-sum-exps here are stable anyway). Masks are `[B, K]` (bool or
0/1, `None` = all valid); masked elements change nothing whatever they hold, masked logits use a large finite
negative (never -inf), and empty sets give finite values (0), never NaN.
"""

import keras
import numpy as np
from keras import ops

from tfemde import similarity as _similarity
from tfemde.layers.masking import (NEGATIVE, as_float32, check_number, check_positive, check_rank, float_mask,
                                   masked_set)

__all__ = [
    "smooth_chamfer_similarity",
    "chamfer_similarity",
    "max_similarity",
    "triplet_loss",
    "info_nce_loss",
    "mmd_loss",
    "diversity_loss",
    "centroid_triplet_loss",
    "batch_centroids",
    "positive_mask",
]


# The set similarities' 0.1 names and argument names (x, y, x_mask, y_mask); they go away after tfemde 0.1.
def smooth_chamfer_similarity(x, y, alpha=16.0, x_mask=None, y_mask=None):
    """Deprecated: `tfemde.similarity.smooth_chamfer(a_sets, b_sets, alpha, a_mask, b_mask)`."""
    return _similarity.smooth_chamfer(x, y, alpha, x_mask, y_mask)


def chamfer_similarity(x, y, x_mask=None, y_mask=None):
    """Deprecated: `tfemde.similarity.chamfer(a_sets, b_sets, a_mask, b_mask)`."""
    return _similarity.chamfer(x, y, x_mask, y_mask)


def max_similarity(x, y, x_mask=None, y_mask=None):
    """Deprecated: `tfemde.similarity.max_similarity(a_sets, b_sets, a_mask, b_mask)`."""
    return _similarity.max_similarity(x, y, x_mask, y_mask)


def _similarity_and_positives(similarity, positive_mask):
    similarity = as_float32(similarity)
    check_rank(similarity.shape, 2, "similarity", "[num_queries, num_candidates]")
    if positive_mask is None:
        rows, cols = similarity.shape
        if rows is None or cols is None or rows != cols:
            raise ValueError(
                "positive_mask may be None (positives on the diagonal) only for a square similarity with a static "
                f"shape; got similarity shape {tuple(similarity.shape)}"
            )
        return similarity, ops.convert_to_tensor(np.eye(rows, dtype=bool))
    positive_mask = ops.convert_to_tensor(positive_mask)
    check_rank(positive_mask.shape, 2, "positive_mask", "[num_queries, num_candidates]")
    for got, want in zip(positive_mask.shape, similarity.shape):
        if got is not None and want is not None and got != want:
            raise ValueError(
                f"positive_mask must have the shape of similarity {tuple(similarity.shape)}; "
                f"got shape {tuple(positive_mask.shape)}"
            )
    return similarity, float_mask(positive_mask, similarity) > 0


def _sum_of_excess(values, valid, thresholds):
    """`out[r, t] = sum_m valid[r, m] * max(values[r, m] - thresholds[r, t], 0)` in O(R * (M + T)) memory.

    Sort each row's valid values in descending order u; with `n` the number of them above a threshold t, the sum is
    `(u_0 + ... + u_{n-1}) - n t`. The counts come from one argsort of the values merged with the thresholds, so no
    `[R, T, M]` tensor is built. Gradients flow through the sorted gather and the prefix sums; the counts are
    integers. Invalid values become a large finite negative, below every threshold, and are never counted.
    """
    size = ops.shape(values)[1]
    masked = ops.where(valid, values, NEGATIVE)
    ordered = ops.take_along_axis(masked, ops.argsort(-masked, axis=1), axis=1)
    ordered = ops.where(ordered > NEGATIVE / 2, ordered, 0.0)
    prefix = ops.concatenate([ops.zeros_like(ordered[:, :1]), ops.cumsum(ordered, axis=1)], axis=1)  # [R, M + 1]
    merged = ops.concatenate([masked, thresholds], axis=1)  # [R, M + T]
    is_value = ops.concatenate([ops.ones_like(masked), ops.zeros_like(thresholds)], axis=1)
    order = ops.argsort(-merged, axis=1)
    values_so_far = ops.cumsum(ops.take_along_axis(is_value, order, axis=1), axis=1)
    position = ops.argsort(order, axis=1)[:, size:]  # where each threshold landed in the merged order
    # values ranked before a threshold (ties either way add 0); invalid values sort last, below any threshold
    count = ops.cast(ops.take_along_axis(values_so_far, position, axis=1), "int32")
    return ops.take_along_axis(prefix, count, axis=1) - ops.cast(count, "float32") * thresholds


@keras.saving.register_keras_serializable(package="tfemde")
def triplet_loss(similarity, positive_mask, margin=0.2, hardest=True, reduction="mean"):
    """Bidirectional triplet ranking loss with several positives per query (VSE++ / DivE, ALGORITHMS.md §3.4).

    For every positive pair (i, c) (image i, caption c):
    - image-to-text term: `max_{c' negative for i} [margin + S[i, c'] - S[i, c]]_+`;
    - text-to-image term: `max_{j negative for c} [margin + S[j, c] - S[i, c]]_+`.
    Every positive of an image (caption) is excluded from its negatives. `hardest=False` replaces each max by the
    sum over all negatives (the VSE0 warm-up epoch). A pair without negatives contributes 0.

    Reductions (checked against `kdwonn/DivE: loss.py` and `woodfrog/vse_infty: lib/loss.py`):
    - `"mean"` (DivE): the mean of the terms over the positive pairs, per direction, and the two directions
      summed. With hardest negatives this is exactly DivE's `i2t_loss + t2i_loss` (its t2i mean over captions
      is the mean over positive pairs, one image per caption). With `hardest=False` DivE would also average over
      the negatives; here the per-pair sum over negatives is kept, so the two modes differ only in the max/sum.
    - `"sum"` (VSE∞ / VSE++): the sum over all positive pairs of both directions. With one positive per row and
      column this is exactly VSE∞'s `cost_s.sum() + cost_im.sum()`, with or without hardest negatives.

    Memory is O(Bi * Bc) in both modes: the sums over all negatives use sorted prefix sums, not `[Bi, Bc, Bc]`.

    Args:
        similarity: `[Bi, Bc]` scores of images (rows) against captions (columns).
        positive_mask: `[Bi, Bc]` bool or 0/1, 1 where caption c matches image i (e.g. equal image ids).
            `None` means the diagonal of a square matrix.
        margin: the margin m (0.2 in VSE∞ and DivE).
        hardest: hardest negative only (True) or the sum over all negatives (False).
        reduction: `"mean"` or `"sum"`, see above.

    Returns:
        A float32 scalar.

    Example:
        >>> import numpy as np
        >>> similarity = np.array([[0.9, 0.3, 0.8, 0.1], [0.2, 0.4, 0.7, 0.6]], "float32")
        >>> positives = np.array([0, 1])[:, None] == np.array([0, 0, 1, 1])[None, :]  # two captions per image
        >>> round(float(triplet_loss(similarity, positives, margin=0.2)), 4)
        0.35
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum"; got {reduction!r}')
    check_number(margin, "margin", positive=False)
    similarity, positive = _similarity_and_positives(similarity, positive_mask)
    negative = ops.logical_not(positive)
    if hardest:
        hardest_caption = ops.max(ops.where(negative, similarity, NEGATIVE), axis=1, keepdims=True)  # [Bi, 1]
        hardest_image = ops.max(ops.where(negative, similarity, NEGATIVE), axis=0, keepdims=True)  # [1, Bc]
        i2t = ops.relu(margin + hardest_caption - similarity)
        t2i = ops.relu(margin + hardest_image - similarity)
    else:
        # i2t[i, c] = sum_c' neg[i, c'] [S[i, c'] - (S[i, c] - m)]_+ ; t2i the same on the transpose.
        i2t = _sum_of_excess(similarity, negative, similarity - margin)
        t2i = ops.transpose(
            _sum_of_excess(ops.transpose(similarity), ops.transpose(negative), ops.transpose(similarity) - margin)
        )
    i2t = ops.sum(ops.where(positive, i2t, 0.0))
    t2i = ops.sum(ops.where(positive, t2i, 0.0))
    if reduction == "sum":
        return i2t + t2i
    num_positive = ops.maximum(ops.sum(ops.cast(positive, "float32")), 1.0)
    return i2t / num_positive + t2i / num_positive


@keras.saving.register_keras_serializable(package="tfemde")
def info_nce_loss(similarity, positive_mask, temperature=0.05):
    """Symmetric InfoNCE with several positives per row: -log of the positives' share of the softmax.

    Row i (an image): `lse_c(S[i, c] / t) - lse_{c positive}(S[i, c] / t)`, averaged over rows that have a
    positive; the same over columns (captions); the two directions averaged (CLIP convention).

    Args:
        similarity: `[Bi, Bc]` scores.
        positive_mask: `[Bi, Bc]` bool or 0/1 (`None` = diagonal of a square matrix).
        temperature: the softmax temperature t.

    Returns:
        A float32 scalar.

    Example:
        >>> import numpy as np
        >>> round(float(info_nce_loss(np.eye(3, dtype="float32"), np.eye(3, dtype=bool), temperature=0.5)), 4)
        0.2395
    """
    check_positive(temperature, "temperature")
    similarity, positive = _similarity_and_positives(similarity, positive_mask)
    logits = similarity / temperature
    positive_logits = ops.where(positive, logits, NEGATIVE)

    def direction(axis):
        per_row = ops.logsumexp(logits, axis=axis) - ops.logsumexp(positive_logits, axis=axis)
        has_positive = ops.any(positive, axis=axis)
        count = ops.maximum(ops.sum(ops.cast(has_positive, "float32")), 1.0)
        return ops.sum(ops.where(has_positive, per_row, 0.0)) / count

    return 0.5 * (direction(1) + direction(0))


def _flat_points(x, mask, arg, mask_arg):
    """float32 points `[N, D]` and 0/1 weights `[N]` from `[N, D]` (mask `[N]`) or `[B, K, D]` (mask `[B, K]`)."""
    x = as_float32(x)
    if len(x.shape) not in (2, 3):
        raise ValueError(f"{arg} must have shape [num_points, dim] or [batch, set_size, dim]; got shape {tuple(x.shape)}")
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        if len(mask.shape) != len(x.shape) - 1 or any(
            g is not None and w is not None and g != w for g, w in zip(mask.shape, x.shape[:-1])
        ):
            raise ValueError(f"{mask_arg} must have shape {tuple(x.shape[:-1])} to match {arg}; got shape {tuple(mask.shape)}")
        valid = float_mask(mask, x)
    else:
        valid = ops.ones(ops.shape(x)[:-1], "float32")
    x = ops.reshape(x, (-1, ops.shape(x)[-1]))
    valid = ops.reshape(valid, (-1,))
    x = ops.where(valid[:, None] > 0, x, ops.zeros_like(x))
    return x, valid


def _laplacian_kernel_mean(a, wa, b, wb, gamma, same):
    """Weighted mean of exp(-gamma ||a_i - b_j||) over pairs (diagonal included)."""
    sq = (
        ops.sum(ops.square(a), axis=1)[:, None]
        + ops.sum(ops.square(b), axis=1)[None, :]
        - 2.0 * ops.matmul(a, ops.transpose(b))
    )
    if same:  # the self-distance is exactly 0; the expanded form leaves rounding noise there
        n = ops.shape(a)[0]
        sq = ops.where(ops.eye(n, dtype="bool"), 0.0, sq)
    # max(d^2, 1e-12) before sqrt: a finite gradient at zero distance (ALGORITHMS.md §9.7).
    kernel = ops.exp(-gamma * ops.sqrt(ops.maximum(sq, 1e-12)))
    weight = wa[:, None] * wb[None, :]
    return ops.sum(weight * kernel) / ops.maximum(ops.sum(weight), 1.0)


@keras.saving.register_keras_serializable(package="tfemde")
def mmd_loss(x, y, gamma=0.5, x_mask=None, y_mask=None):
    """Maximum mean discrepancy with the Laplacian kernel exp(-gamma ||a - b||) (DivE, ALGORITHMS.md §3.4).

    `mean k(x, x) - 2 mean k(x, y) + mean k(y, y)` over all valid pairs, diagonals included, on the non-squared
    Euclidean distance computed as `sqrt(max(d**2, 1e-12))` (finite gradient at zero distance). A term with an
    empty side is 0.

    Args:
        x: `[Nx, D]` points, or `[B, K, D]` sets (flattened to `B*K` points).
        y: `[Ny, D]` or `[B', K', D]`, same D.
        gamma: the kernel scale (0.5 in DivE).
        x_mask: optional `[Nx]` or `[B, K]` validity mask.
        y_mask: optional `[Ny]` or `[B', K']` validity mask.

    Returns:
        A float32 scalar.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(4, 2, 8))
        >>> round(float(mmd_loss(x, x.reshape(8, 8))), 4), round(float(mmd_loss(x, rng.normal(size=(6, 8)) + 3)), 4)
        (0.0, 0.5416)
    """
    check_positive(gamma, "gamma")
    x, wx = _flat_points(x, x_mask, "x", "x_mask")
    y, wy = _flat_points(y, y_mask, "y", "y_mask")
    if x.shape[-1] is not None and y.shape[-1] is not None and x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x and y must have the same dim D (last axis); got D={x.shape[-1]} and D={y.shape[-1]}")
    return (
        _laplacian_kernel_mean(x, wx, x, wx, gamma, True)
        - 2.0 * _laplacian_kernel_mean(x, wx, y, wy, gamma, False)
        + _laplacian_kernel_mean(y, wy, y, wy, gamma, True)
    )


@keras.saving.register_keras_serializable(package="tfemde")
def diversity_loss(sets, t=2.0, mask=None):
    """DivE's uniformity (diversity) loss inside each set (ALGORITHMS.md §3.4).

    With `e` the L2-normalised elements of a set, `u = sum_{i<j} exp(-t ||e_i - e_j||^2) / (K (K - 1) / 2)`,
    averaged over the batch. With a mask, K is the number of valid elements and sets with fewer than two valid
    elements are left out of the batch mean (a batch without any such set gives 0, as does K = 1).

    Args:
        sets: `[B, K, D]` (DivE uses the residual slots before the global feature is added).
        t: the kernel scale (2 in DivE).
        mask: optional `[B, K]` validity mask.

    Returns:
        A float32 scalar.

    Example:
        >>> import numpy as np
        >>> orthogonal, identical = np.eye(3, 8)[None].repeat(2, 0), np.ones((2, 3, 8)) / 8**0.5
        >>> round(float(diversity_loss(orthogonal, t=2.0)), 4), round(float(diversity_loss(identical, t=2.0)), 4)
        (0.0183, 1.0)
    """
    check_positive(t, "t")
    x, valid = masked_set(sets, mask, "sets", "mask")
    e = x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), 1e-12)
    sq_norm = ops.sum(ops.square(e), axis=-1)  # 1, or 0 for a zero element
    gram = ops.einsum("bkd,bld->bkl", e, e)
    sq_dist = ops.maximum(sq_norm[:, :, None] + sq_norm[:, None, :] - 2.0 * gram, 0.0)
    size = ops.shape(x)[1]
    upper = ops.triu(ops.ones((size, size), "float32"), k=1)  # pairs i < j
    pair = upper[None] * valid[:, :, None] * valid[:, None, :]
    n = ops.sum(valid, axis=1)
    num_pairs = n * (n - 1.0) / 2.0
    per_set = ops.sum(pair * ops.exp(-t * sq_dist), axis=(1, 2)) / ops.maximum(num_pairs, 1.0)
    has_pairs = num_pairs > 0
    count = ops.maximum(ops.sum(ops.cast(has_pairs, "float32")), 1.0)
    return ops.sum(ops.where(has_pairs, per_set, 0.0)) / count


def batch_centroids(sets, labels, sketches=None):
    """Per-slot class centroids inside a batch: for every member i, its class's centroid and the leave-one-out one.

    `centroid[i] = unit_per_slot(mean_{j: labels_j = labels_i} sets_j)` and `leave_one_out[i]` the same mean without
    `sets_i` (0 for a class of one). Sketches, when given, are averaged the same way (not normalised), as the
    centroid galleries do (`tfemde.serving.centroids`, `"slot_mean"`).

    Args:
        sets: `[B, K, D]` unit elements.
        labels: `[B]` class of each member.
        sketches: optional `[B, S]`.

    Returns:
        `(centroids, leave_one_out, class_size)`: dicts `{"set": [B, K, D], "sketch": [B, S] | None}` and `[B]` float32.
    """
    x = as_float32(sets)
    labels = ops.convert_to_tensor(labels)
    same = ops.cast(ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0)), "float32")  # [B, B]
    size = ops.sum(same, axis=1)
    flat = ops.reshape(x, (ops.shape(x)[0], -1))
    sums = ops.matmul(same, flat)
    shape = ops.shape(x)

    def unit(v):
        v = ops.reshape(v, shape)
        return v / ops.maximum(ops.sqrt(ops.sum(ops.square(v), axis=-1, keepdims=True)), 1e-12)

    centroids = {"set": unit(sums / size[:, None]), "sketch": None}
    others = ops.maximum(size - 1.0, 1.0)[:, None]
    leave_one_out = {"set": unit((sums - flat) / others), "sketch": None}
    if sketches is not None:
        sk = as_float32(sketches)
        sketch_sums = ops.matmul(same, sk)
        centroids["sketch"] = sketch_sums / size[:, None]
        leave_one_out["sketch"] = (sketch_sums - sk) / others
    return centroids, leave_one_out, size


def centroid_triplet_loss(score_fn, sets, labels, sketches=None, margin=0.2):
    """The centroid triplet loss of Wieczorek et al. (2021) in the model's similarity (higher is closer).

    For every image i whose class has another member in the batch:
    `[margin + max_{j: labels_j != labels_i} S(x_i, c_j) - S(x_i, c_i^{-i})]_+`, with `c_j` the per-slot centroid of
    j's class and `c_i^{-i}` the centroid of i's class without i (leave-one-out, as centroids-reid builds the
    positive from the other members). Averaged over those images; 0 when there are none.

    Args:
        score_fn: `(a, b) -> [Na, Nb]` similarity of `{"set", "sketch"}` dicts (the DualEncoder's `similarity`).
        sets: `[B, K, D]` image sets; labels: `[B]` classes; sketches: optional `[B, S]`.
        margin: the margin.

    Returns:
        A float32 scalar.
    """
    check_number(margin, "margin", positive=False)
    labels = ops.convert_to_tensor(labels)
    centroids, leave_one_out, size = batch_centroids(sets, labels, sketches)
    anchor = {"set": as_float32(sets), "sketch": None if sketches is None else as_float32(sketches)}
    positive = ops.diagonal(score_fn(anchor, leave_one_out))  # [B]
    other = ops.logical_not(ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0)))
    hardest = ops.max(ops.where(other, score_fn(anchor, centroids), NEGATIVE), axis=1)
    valid = ops.logical_and(size > 1.0, ops.any(other, axis=1))
    per_anchor = ops.relu(margin + hardest - positive)
    count = ops.maximum(ops.sum(ops.cast(valid, "float32")), 1.0)
    return ops.sum(ops.where(valid, per_anchor, 0.0)) / count


def positive_mask(batch):
    """`[Bi, Bc]` bool: which (image, caption) pairs of a batch are positives.

    Paired batches (caption i belongs with image i, what `tfemde.data.train_dataset` yields) carry `image_id` and
    optionally `group_id`, both `[B]`: pairs with equal ids (or groups) are positives, so several captions of one
    image are masked out of each other's negatives. When `text_id [B]` is present too, a caption is also a positive
    of every image whose caption in the batch has the same text (the emoji data holds 261 images captioned "flag").
    Separately batched items and captions (DivE's B images with their 5B captions, each image encoded once) carry
    `image_id [Bi]` and `caption_image_id [Bc]`, and optionally `group_id [Bi]` with `caption_group_id [Bc]`.
    """
    if "caption_image_id" in batch:
        if "group_id" in batch and "caption_group_id" in batch:
            image_key, caption_key = batch["group_id"], batch["caption_group_id"]
        else:
            image_key, caption_key = batch["image_id"], batch["caption_image_id"]
        return ops.equal(ops.expand_dims(image_key, 1), ops.expand_dims(caption_key, 0))
    key = batch["group_id"] if "group_id" in batch else batch["image_id"]
    positives = ops.equal(ops.expand_dims(key, 1), ops.expand_dims(key, 0))
    if "text_id" in batch:
        text = batch["text_id"]
        positives = ops.logical_or(positives, ops.equal(ops.expand_dims(text, 1), ops.expand_dims(text, 0)))
    return positives
