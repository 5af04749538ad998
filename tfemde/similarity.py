"""The similarities the dual encoder trains with, in Keras ops (ALGORITHMS.md §3.3, §5.3).

`smooth_chamfer`, `sketch_similarity` and `similarity` have the names, arguments and numbers of their NumPy twins
in `tfemde.serving.similarity`, which scores exported embeddings without TensorFlow (`tests/test_similarity.py`
checks they agree). `chamfer` and `max_similarity` are the alternatives of DivE's ablation (training only).

Every function casts its inputs to float32 and computes in float32, so it is safe under `mixed_float16` (exp(16)
overflows float16; the log-sum-exps here are stable anyway). Masks are `[B, K]` (bool or 0/1, `None` = all valid);
masked elements change nothing whatever they hold, masked logits use a large finite negative (never -inf), and
empty sets give finite values (0), never NaN.
"""

import keras
from keras import ops

from tfemde.layers.masking import NEGATIVE, check_positive, check_rank, masked_set
from tfemde.layers.sketch import sketch_similarity as _row_cosines

__all__ = ["chamfer", "max_similarity", "similarity", "sketch_similarity", "smooth_chamfer"]


def _pairwise_cosines(a_sets, b_sets, a_mask, b_mask):
    """Inner products of all element pairs `[Bx, By, Kx, Ky]`, the masks broadcast to it, and set sizes."""
    x, mx = masked_set(a_sets, a_mask, "a_sets", "a_mask")
    y, my = masked_set(b_sets, b_mask, "b_sets", "b_mask")
    if x.shape[-1] is not None and y.shape[-1] is not None and x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"a_sets and b_sets must have the same element dim D: a_sets [Ba, Ka, D], b_sets [Bb, Kb, D]; "
            f"got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    cos = ops.einsum("akd,bld->abkl", x, y)
    mx4 = mx[:, None, :, None]  # [Bx, 1, Kx, 1]
    my4 = my[None, :, None, :]  # [1, By, 1, Ky]
    nx = ops.sum(mx, axis=1)[:, None]  # [Bx, 1]
    ny = ops.sum(my, axis=1)[None, :]  # [1, By]
    return cos, mx4, my4, nx, ny


def _both_nonempty(nx, ny):
    return ops.logical_and(nx > 0, ny > 0)  # [Bx, By]


@keras.saving.register_keras_serializable(package="tfemde")
def smooth_chamfer(a_sets, b_sets, alpha=16.0, a_mask=None, b_mask=None):
    """Smooth-Chamfer similarity of two batches of sets (DivE, ALGORITHMS.md §3.3).

    `s(X, Y) = 1/(2 alpha |X|) sum_{x in X} logsumexp_{y in Y}(alpha <x, y>)
             + 1/(2 alpha |Y|) sum_{y in Y} logsumexp_{x in X}(alpha <x, y>)`,
    with a stable log-sum-exp in float32. Elements are used as given (L2-normalise them for cosines). |X| and |Y|
    count valid elements; masked elements are left out of the log-sum-exps and the means. A pair in which either
    set is empty scores 0.

    Args:
        a_sets: `[Ba, Ka, D]` sets (e.g. image embeddings).
        b_sets: `[Bb, Kb, D]` sets (e.g. caption embeddings).
        alpha: the inverse temperature (16 in DivE's script). As alpha grows, this tends to `chamfer`.
        a_mask: optional `[Ba, Ka]` validity mask of a_sets' elements.
        b_mask: optional `[Bb, Kb]` validity mask of b_sets' elements.

    Returns:
        `[Ba, Bb]` float32 similarity matrix.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(2, 4, 8))
        >>> x /= np.linalg.norm(x, axis=-1, keepdims=True)
        >>> tuple(smooth_chamfer(x, x[:1], alpha=16.0).shape)
        (2, 1)
    """
    check_positive(alpha, "alpha")
    cos, mx4, my4, nx, ny = _pairwise_cosines(a_sets, b_sets, a_mask, b_mask)
    logits = alpha * cos
    # x -> Y: one log-sum-exp over Y per element of X; then the mean over valid x.
    x_to_y = ops.logsumexp(ops.where(my4 > 0, logits, NEGATIVE), axis=3) / alpha  # [Bx, By, Kx]
    x_valid = ops.logical_and(mx4[..., 0] > 0, ny[:, :, None] > 0)
    x_term = ops.sum(ops.where(x_valid, x_to_y, 0.0), axis=2) / ops.maximum(nx, 1.0)
    y_to_x = ops.logsumexp(ops.where(mx4 > 0, logits, NEGATIVE), axis=2) / alpha  # [Bx, By, Ky]
    y_valid = ops.logical_and(my4[:, :, 0, :] > 0, nx[:, :, None] > 0)
    y_term = ops.sum(ops.where(y_valid, y_to_x, 0.0), axis=2) / ops.maximum(ny, 1.0)
    return ops.where(_both_nonempty(nx, ny), 0.5 * (x_term + y_term), 0.0)


@keras.saving.register_keras_serializable(package="tfemde")
def chamfer(a_sets, b_sets, a_mask=None, b_mask=None):
    """Chamfer similarity: the mean nearest-neighbour inner product, both ways, halved (ALGORITHMS.md §3.3).

    `s(X, Y) = 1/(2|X|) sum_x max_y <x, y> + 1/(2|Y|) sum_y max_x <x, y>`, over valid elements; 0 if a set is empty.

    Args:
        a_sets: `[Ba, Ka, D]` sets.
        b_sets: `[Bb, Kb, D]` sets.
        a_mask: optional `[Ba, Ka]` validity mask.
        b_mask: optional `[Bb, Kb]` validity mask.

    Returns:
        `[Ba, Bb]` float32 similarity matrix.

    Example:
        >>> import numpy as np
        >>> np.asarray(chamfer(np.ones((2, 3, 4)), np.ones((1, 1, 4))))
        array([[4.],
               [4.]], dtype=float32)
    """
    cos, mx4, my4, nx, ny = _pairwise_cosines(a_sets, b_sets, a_mask, b_mask)
    x_to_y = ops.max(ops.where(my4 > 0, cos, NEGATIVE), axis=3)  # [Bx, By, Kx]
    x_valid = ops.logical_and(mx4[..., 0] > 0, ny[:, :, None] > 0)
    x_term = ops.sum(ops.where(x_valid, x_to_y, 0.0), axis=2) / ops.maximum(nx, 1.0)
    y_to_x = ops.max(ops.where(mx4 > 0, cos, NEGATIVE), axis=2)  # [Bx, By, Ky]
    y_valid = ops.logical_and(my4[:, :, 0, :] > 0, nx[:, :, None] > 0)
    y_term = ops.sum(ops.where(y_valid, y_to_x, 0.0), axis=2) / ops.maximum(ny, 1.0)
    return ops.where(_both_nonempty(nx, ny), 0.5 * (x_term + y_term), 0.0)


@keras.saving.register_keras_serializable(package="tfemde")
def max_similarity(a_sets, b_sets, a_mask=None, b_mask=None):
    """Max-of-max (MIL / PVSE) similarity: the largest inner product over all valid element pairs; 0 if empty.

    Args:
        a_sets: `[Ba, Ka, D]` sets.
        b_sets: `[Bb, Kb, D]` sets.
        a_mask: optional `[Ba, Ka]` validity mask.
        b_mask: optional `[Bb, Kb]` validity mask.

    Returns:
        `[Ba, Bb]` float32 similarity matrix.

    Example:
        >>> import numpy as np
        >>> np.asarray(max_similarity(np.eye(3)[None], np.eye(3)[None]))
        array([[1.]], dtype=float32)
    """
    cos, mx4, my4, nx, ny = _pairwise_cosines(a_sets, b_sets, a_mask, b_mask)
    pair_valid = ops.logical_and(mx4 > 0, my4 > 0)
    best = ops.max(ops.where(pair_valid, cos, NEGATIVE), axis=(2, 3))
    return ops.where(_both_nonempty(nx, ny), best, 0.0)



def sketch_similarity(a_sketches, b_sketches, depth, weight=1.0):
    """T-EMDE sketch similarity: `weight` × the mean over `depth` partitionings of the row cosines.

    Rows are L2-normalised inside (`tfemde.layers.sketch_similarity`), so for the encoders' normalised sketches this
    is `weight · <a, b> / depth`, as `tfemde.serving.sketch_similarity` computes it.

    Args:
        a_sketches: `[Ba, S]` flattened sketches, `S = depth · W`.
        b_sketches: `[Bb, S]`.
        depth: the number of partitionings (rows) in each sketch.
        weight: a factor on the result (`similarity` passes `sketch_weight`).

    Returns:
        `[Ba, Bb]` float32.
    """
    a = ops.cast(ops.convert_to_tensor(a_sketches), "float32")
    b = ops.cast(ops.convert_to_tensor(b_sketches), "float32")
    check_rank(a.shape, 2, "a_sketches", "[batch_a, sketch_size]")
    check_rank(b.shape, 2, "b_sketches", "[batch_b, sketch_size]")
    depth = int(depth)
    if depth < 1 or (a.shape[-1] is not None and a.shape[-1] % depth):
        raise ValueError(f"depth must be a positive divisor of the sketch size {a.shape[-1]}; got {depth}")
    return weight * _row_cosines(ops.reshape(a, (ops.shape(a)[0], depth, -1)),
                                 ops.reshape(b, (ops.shape(b)[0], depth, -1)))


def similarity(a, b, alpha=16.0, sketch_weight=0.0, sketch_depth=None):
    """The tfemde score of every pair of two batches: Smooth-Chamfer over the sets + λ · sketch similarity.

    `s(x, y) = s_SC(X, Y) + sketch_weight · <Ŝ_x, Ŝ_y> / sketch_depth`, what `DualEncoder` trains with and
    `tfemde.serving.similarity` serves.

    Args:
        a: an encoder's outputs `{"set": [Ba, Ka, D], "sketch": [Ba, S] (optional)}`.
        b: the same for the other batch, `{"set": [Bb, Kb, D], ...}`.
        alpha: the Smooth-Chamfer temperature α.
        sketch_weight: λ; 0 ignores the sketches.
        sketch_depth: the number of partitionings in a sketch (needed when `sketch_weight != 0`).

    Returns:
        `[Ba, Bb]` float32.
    """
    score = smooth_chamfer(a["set"], b["set"], alpha=alpha)
    if sketch_weight:
        if a.get("sketch") is None or b.get("sketch") is None or not sketch_depth:
            raise ValueError("sketch_weight != 0 needs a 'sketch' in both a and b and sketch_depth; got "
                             f"sketch_depth={sketch_depth!r}, sketches in a: {a.get('sketch') is not None}, "
                             f"in b: {b.get('sketch') is not None}")
        score = score + sketch_similarity(a["sketch"], b["sketch"], sketch_depth, weight=sketch_weight)
    return score
