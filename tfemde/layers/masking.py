"""Shared argument checks and mask handling for tfemde layers and losses."""

import keras
from keras import ops


def check_rank(shape, rank, arg, layout):
    """Raise a ValueError naming `arg` unless `shape` has `rank` dimensions.

    Args:
        shape: a shape tuple (entries may be None).
        rank: the expected number of dimensions.
        arg: the argument name to report, e.g. `"inputs"`.
        layout: the expected layout to report, e.g. `"[batch, length, dim]"`.
    """
    if shape is None or len(shape) != rank:
        raise ValueError(f"{arg} must have shape {layout} (rank {rank}); got shape {tuple(shape) if shape is not None else None}")


def check_mask_shape(mask_shape, inputs_shape, arg="mask", layout="[batch, length]"):
    """Raise a ValueError unless a mask of `mask_shape` fits the first two axes of `inputs_shape`."""
    check_rank(mask_shape, 2, arg, layout)
    for got, want in zip(mask_shape, inputs_shape[:2]):
        if got is not None and want is not None and got != want:
            raise ValueError(
                f"{arg} must have shape {layout} = {tuple(inputs_shape[:2])} to match the inputs; "
                f"got shape {tuple(mask_shape)}"
            )


def float_mask(mask, like, dtype="float32"):
    """A mask `[B, L]` (bool or 0/1 of any dtype, or None for all valid) as 0./1. in `dtype`.

    Args:
        mask: `[B, L]` bool or numeric, or None.
        like: a tensor `[B, L, ...]` giving the shape to use when `mask` is None.
        dtype: the float dtype of the result.

    Returns:
        `[B, L]` tensor of 0. and 1.
    """
    if mask is None:
        return ops.ones(ops.shape(like)[:2], dtype=dtype)
    if mask.dtype == "bool":
        return ops.cast(mask, dtype)
    return ops.cast(ops.not_equal(mask, 0), dtype)


@keras.saving.register_keras_serializable(package="tfemde")
class AllValidMask(keras.layers.Layer):
    """`[B, L, D] -> [B, L]` bool of ones: the mask of a dense grid."""

    def call(self, inputs):
        return keras.ops.ones(keras.ops.shape(inputs)[:2], dtype="bool")

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape[:2], dtype="bool")
