"""`SelfAttentionBlock`: the `attention` preset's aggregator (the self-attention that T-EMDE replaces)."""

import keras
from keras import ops

from tfemde.layers.pooling import MaskedMeanPooling


@keras.saving.register_keras_serializable(package="tfemde")
class SelfAttentionBlock(keras.layers.Layer):
    """The `attention` preset's aggregator: x + MHA(LN(x)) over the valid elements, then masked mean pooling.

    Call arguments:
        inputs: `[B, L, D]`. mask: `[B, L]` bool.

    Returns:
        `[B, D]`.
    """

    def __init__(self, num_heads=8, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.dropout = dropout
        self.supports_masking = True

    def compute_mask(self, inputs, mask=None):
        return None

    def build(self, inputs_shape, mask_shape=None):
        dim = inputs_shape[-1]
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")
        self.norm.build(inputs_shape)
        self.attention = keras.layers.MultiHeadAttention(self.num_heads, max(dim // self.num_heads, 1),
                                                   dropout=self.dropout, name="attention")
        self.attention.build(inputs_shape, inputs_shape)
        self.pool = MaskedMeanPooling(name="pool")

    def call(self, inputs, mask=None, training=None):
        normed = self.norm(inputs)
        pair_mask = None if mask is None else ops.logical_and(mask[:, :, None], mask[:, None, :])
        attended = self.attention(normed, normed, attention_mask=pair_mask, training=training)
        return self.pool(inputs + attended, mask=mask)

    def compute_output_spec(self, inputs, mask=None, training=None):
        return keras.KerasTensor((inputs.shape[0], inputs.shape[-1]), dtype=self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "dropout": self.dropout}
