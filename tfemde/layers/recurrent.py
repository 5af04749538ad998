"""`AveragedBiGRU`: a bidirectional GRU whose two directions are averaged (the text tower's and GPO's recurrence)."""

import contextlib
import contextvars

import keras
from keras import ops

# While set, every `AveragedBiGRU.call` returns `substitute(layer, inputs, mask)` instead of running its GRUs; the
# ONNX export traces the encoders this way to put onnxruntime's own GRU op in place of the converted loops.
_SUBSTITUTE = contextvars.ContextVar("tfemde_averaged_bigru_substitute", default=None)


@contextlib.contextmanager
def substituted(substitute):
    """Within the block, `AveragedBiGRU` layers return `substitute(layer, inputs, mask)`: what their `call`
    would return (the sequence, and with `return_state` the two states), computed elsewhere."""
    token = _SUBSTITUTE.set(substitute)
    try:
        yield
    finally:
        _SUBSTITUTE.reset(token)


@keras.saving.register_keras_serializable(package="tfemde")
class AveragedBiGRU(keras.layers.Layer):
    """A forward and a backward GRU over right-padded sequences, their outputs averaged.

    It computes what `keras.layers.Bidirectional(GRU(units, return_sequences=True), merge_mode="ave")` computes:
    the backward GRU starts at each sequence's last valid step (Keras RNNs skip masked steps and carry their state,
    as PyTorch's packed sequences do), its outputs are flipped back into time order, and masked steps output zeros.
    `Bidirectional` clones its layer through serialization in its constructor; while a model loads, Keras matches
    serialized objects by `id()`, so a clone can come back as an unrelated, earlier layer whose id was reused (seen
    as "Forward layer and backward layer should have different `go_backwards` value"). This layer builds its two
    GRUs directly.

    Args:
        units: hidden size of each direction.
        return_state: also return the final state of each direction.

    Call arguments:
        inputs: `[B, T, F]`.
        mask: optional `[B, T]` bool, True at valid steps (right-padded).

    Returns:
        `[B, T, units]` averaged outputs (zeros at masked steps); with `return_state`, also the forward and the
        backward final states, `[B, units]` each.

    Example:
        >>> import numpy as np
        >>> gru = AveragedBiGRU(4)
        >>> tuple(gru(np.ones((2, 5, 3), "float32"), mask=np.array([[1, 1, 1, 0, 0]] * 2, bool)).shape)
        (2, 5, 4)
    """

    def __init__(self, units, return_state=False, **kwargs):
        super().__init__(**kwargs)
        if int(units) < 1:
            raise ValueError(f"units must be a positive int; got {units!r}")
        self.units = int(units)
        self.return_state = bool(return_state)
        self.supports_masking = True

    def build(self, input_shape):
        common = dict(return_sequences=True, return_state=True, zero_output_for_mask=True, dtype=self.dtype_policy)
        self.forward_layer = keras.layers.GRU(self.units, name="forward_gru", **common)
        self.backward_layer = keras.layers.GRU(self.units, go_backwards=True, name="backward_gru", **common)
        self.forward_layer.build(input_shape)
        self.backward_layer.build(input_shape)

    def call(self, inputs, mask=None, training=None):
        substitute = _SUBSTITUTE.get()
        if substitute is not None:
            return substitute(self, inputs, mask)
        forward, forward_state = self.forward_layer(inputs, mask=mask, training=training)
        backward, backward_state = self.backward_layer(inputs, mask=mask, training=training)
        averaged = (forward + ops.flip(backward, axis=1)) / 2
        if self.return_state:
            return averaged, forward_state, backward_state
        return averaged

    def compute_mask(self, inputs, mask=None):
        if self.return_state:
            return [mask, None, None]
        return mask

    def compute_output_spec(self, inputs, mask=None, training=None):
        sequence = keras.KerasTensor((inputs.shape[0], inputs.shape[1], self.units), dtype=self.compute_dtype)
        if not self.return_state:
            return sequence
        # One KerasTensor per state: a functional graph tells outputs apart by tensor identity, so a shared spec
        # would wire the backward state into every use of the forward one.
        forward_state, backward_state = (keras.KerasTensor((inputs.shape[0], self.units), dtype=self.compute_dtype)
                                         for _ in range(2))
        return sequence, forward_state, backward_state

    def get_config(self):
        return {**super().get_config(), "units": self.units, "return_state": self.return_state}
