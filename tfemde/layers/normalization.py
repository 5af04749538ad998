"""L2 normalisation: `l2_normalize` (the one every tfemde layer and loss uses) and `UnitNormalize`, its layer."""

import keras
from keras import ops


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """`x / max(||x||, epsilon)` along `axis`, computed in float32 and cast back (as `F.normalize`).

    Args:
        x: a float tensor.
        axis: the axis to normalise.
        epsilon: the smallest norm divided by.

    Returns:
        A tensor of the shape and dtype of `x`.
    """
    x32 = ops.cast(x, "float32")
    sq = ops.sum(ops.square(x32), axis=axis, keepdims=True)
    return ops.cast(x32 * ops.rsqrt(ops.maximum(sq, epsilon * epsilon)), x.dtype)


@keras.saving.register_keras_serializable(package="tfemde")
class UnitNormalize(keras.layers.Layer):
    """L2-normalises the last axis in float32 with a floor on the norm (a zero vector stays zero, no NaN)."""

    def call(self, inputs):
        return l2_normalize(ops.cast(inputs, "float32"))

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype="float32")
