"""Shared argument checks, masks and mask fills for tfemde layers, similarities and losses."""

import keras
import numpy as np
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


# The fill of masked logits in float32 code (similarities, losses): finite, so an all-masked row gives no NaN.
NEGATIVE = -1e9


def lowest(dtype):
    """The lowest finite value of a float dtype (the fill that never wins a max over valid values)."""
    return {"float16": -65504.0, "float64": -1.79e308}.get(keras.backend.standardize_dtype(dtype), -3.38e38)


def mask_value(dtype):
    """A large finite negative for masked logits in `dtype` (never -inf)."""
    return -3.0e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1.0e9


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


def as_float32(x):
    """`x` as a float32 tensor."""
    return ops.cast(ops.convert_to_tensor(x), "float32")


def check_number(value, arg, positive=True):
    """One `ValueError` unless a Python or NumPy number is finite and > 0 (or >= 0); tensors pass unchecked."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise ValueError(f"{arg} must be a number {'>' if positive else '>='} 0; got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not np.isfinite(value) or not (value > 0 if positive else value >= 0):
            raise ValueError(f"{arg} must be a finite number {'>' if positive else '>='} 0; got {value!r}")


def check_positive(value, arg):
    """`check_number` with `positive=True`."""
    check_number(value, arg, positive=True)


def masked_set(x, mask, arg, mask_arg):
    """float32 `x [B, K, D]` with masked elements zeroed, and its 0/1 mask `[B, K]`."""
    x = as_float32(x)
    check_rank(x.shape, 3, arg, "[batch, set_size, dim]")
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        check_mask_shape(mask.shape, x.shape, mask_arg, "[batch, set_size]")
    valid = float_mask(mask, x)
    x = ops.where(ops.expand_dims(valid, -1) > 0, x, ops.zeros_like(x))
    return x, valid


@keras.saving.register_keras_serializable(package="tfemde")
class AllValidMask(keras.layers.Layer):
    """`[B, L, D] -> [B, L]` bool of ones: the mask of a dense grid."""

    def call(self, inputs):
        return keras.ops.ones(keras.ops.shape(inputs)[:2], dtype="bool")

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape[:2], dtype="bool")
