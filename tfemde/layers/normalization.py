"""`UnitNormalize`: L2 normalisation of the last axis as a layer (the vector heads' output)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfemde")
class UnitNormalize(keras.layers.Layer):
    """L2-normalises the last axis with a floor on the norm (a zero vector stays zero, no NaN)."""

    def call(self, inputs):
        inputs = ops.cast(inputs, "float32")
        return inputs / ops.maximum(ops.norm(inputs, axis=-1, keepdims=True), 1e-8)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype="float32")
