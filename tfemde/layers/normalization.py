"""L2 normalisation (`l2_normalize`, the one every tfemde layer and loss uses, and `UnitNormalize`, its layer) and
the batch normalisation that spans replicas (`GlobalBatchNormalization`)."""

import keras
from keras import ops

from tfemde.layers.replicas import placed, replica_context


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


@keras.saving.register_keras_serializable(package="tfemde")
class GlobalBatchNormalization(keras.layers.BatchNormalization):
    """`BatchNormalization` whose training moments are those of the global batch under `tf.distribute`.

    With one replica it is `keras.layers.BatchNormalization`, code and numbers. With R replicas each replica sums
    its (masked) values and counts, the sums are all-reduced, and the variance is taken around the global mean in a
    second all-reduce: the same two-pass moments as one device on the whole batch, so that training on R replicas
    follows training on one (Keras' own `synchronized=True` ignores a mask and uses E[x²] − E[x]²).

    Inputs `[B, ..., C]` (axis -1), optional mask `[B, ...]`; output the shape of the input.
    """

    def _moments(self, inputs, mask):
        context = replica_context()
        if context is None:
            return super()._moments(inputs, mask)
        import tensorflow as tf

        axes = self._reduction_axes
        if mask is None:
            weight = ops.ones_like(inputs)
        else:
            weight = ops.cast(ops.broadcast_to(ops.expand_dims(ops.cast(mask, "bool"), -1), ops.shape(inputs)),
                              inputs.dtype)
        total, count = context.all_reduce(tf.distribute.ReduceOp.SUM, [
            placed(ops.sum(inputs * weight, axes, keepdims=True), context),
            placed(ops.sum(weight, axes, keepdims=True), context)])
        count = count if mask is None else count + keras.backend.epsilon()  # as the masked one-device moments
        mean = total / count
        squared = ops.sum(ops.square((inputs - mean) * weight), axes, keepdims=True)
        squared = context.all_reduce(tf.distribute.ReduceOp.SUM, placed(squared, context))
        return ops.squeeze(mean), ops.squeeze(squared / count)
