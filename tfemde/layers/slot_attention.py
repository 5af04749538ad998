"""Slot Attention (Locatello et al., 2020) with padding masks, ALGORITHMS.md §2.1."""

import math

import keras
from keras import ops

from tfemde.layers.masking import check_mask_shape, check_rank, float_mask


@keras.saving.register_keras_serializable(package="tfemde")
class SlotAttention(keras.layers.Layer):
    """Slot Attention: K slots compete for N inputs over `iterations` rounds of attention + GRU + MLP.

    Follows the google-research TF2 reference (`slot_attention/model.py`): LayerNorms on inputs,
    slots and MLP input (Keras default epsilon); shared `slots_mu`, `slots_log_sigma` `[1, 1, S]`
    (glorot-uniform); q/k/v projections without bias, queries scaled by `S ** -0.5`; softmax over
    the **slot** axis, `+ epsilon`, then normalised over the inputs; a `GRUCell` update and a
    residual MLP.

    Additions to the reference:
      * Masks: padded inputs are dropped *after* the slot softmax, then the weights are
        renormalised over valid inputs; padded values never matter and an all-padded row gives
        zero updates (no NaN). Without padding the arithmetic is exactly the reference's.
      * Slots are sampled `mu + exp(log_sigma) * eps` only when `training`; at inference they are
        `mu` for every sample, so retrieval embeddings are deterministic.

    Args:
        num_slots: K.
        slot_size: S, the slot width.
        iterations: rounds of attention T.
        mlp_hidden_size: hidden width of the residual MLP.
        epsilon: added to the attention weights before normalising over inputs (1e-8).
        seed: seed of the slot-sampling `keras.random.SeedGenerator`.

    Call arguments:
        inputs: `[B, N, Din]` the set.
        mask: optional `[B, N]` bool or 0/1; None means all valid.
        training: sample the initial slots.

    Returns:
        `[B, K, S]` slots.

    Example:
        >>> import numpy as np
        >>> sa = SlotAttention(num_slots=3, slot_size=8, mlp_hidden_size=16)
        >>> tuple(sa(np.ones((2, 5, 4), "float32"), mask=np.ones((2, 5))).shape)
        (2, 3, 8)
    """

    def __init__(self, num_slots, slot_size, iterations=3, mlp_hidden_size=128, epsilon=1e-8, seed=None, **kwargs):
        super().__init__(**kwargs)
        for name, value in (
            ("num_slots", num_slots),
            ("slot_size", slot_size),
            ("iterations", iterations),
            ("mlp_hidden_size", mlp_hidden_size),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.num_slots = int(num_slots)
        self.slot_size = int(slot_size)
        self.iterations = int(iterations)
        self.mlp_hidden_size = int(mlp_hidden_size)
        self.epsilon = float(epsilon)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask=None):
        return None

    def build(self, input_shape):
        check_rank(input_shape, 3, "inputs", "[batch, num_inputs, in_dim]")
        s, policy = self.slot_size, self.dtype_policy
        self.input_norm = keras.layers.LayerNormalization(name="input_norm", dtype=policy)
        self.slot_norm = keras.layers.LayerNormalization(name="slot_norm", dtype=policy)
        self.mlp_norm = keras.layers.LayerNormalization(name="mlp_norm", dtype=policy)
        self.slots_mu = self.add_weight(shape=(1, 1, s), initializer="glorot_uniform", name="slots_mu")
        self.slots_log_sigma = self.add_weight(shape=(1, 1, s), initializer="glorot_uniform", name="slots_log_sigma")
        self.project_q = keras.layers.Dense(s, use_bias=False, name="q", dtype=policy)
        self.project_k = keras.layers.Dense(s, use_bias=False, name="k", dtype=policy)
        self.project_v = keras.layers.Dense(s, use_bias=False, name="v", dtype=policy)
        self.gru = keras.layers.GRUCell(s, name="gru", dtype=policy)
        self.mlp_hidden = keras.layers.Dense(self.mlp_hidden_size, activation="relu", name="mlp_hidden", dtype=policy)
        self.mlp_output = keras.layers.Dense(s, name="mlp_output", dtype=policy)

        input_shape = tuple(input_shape)
        self.input_norm.build(input_shape)
        self.project_k.build(input_shape)
        self.project_v.build(input_shape)
        for layer in (self.slot_norm, self.mlp_norm, self.project_q, self.mlp_hidden):
            layer.build((None, s))
        self.gru.build((None, s))
        self.mlp_output.build((None, self.mlp_hidden_size))
        self.built = True

    def call(self, inputs, mask=None, training=None):
        check_rank(inputs.shape, 3, "inputs", "[batch, num_inputs, in_dim]")
        if mask is not None:
            check_mask_shape(mask.shape, inputs.shape)
        dtype = self.compute_dtype
        k_slots, s = self.num_slots, self.slot_size
        x = ops.cast(inputs, dtype)
        m = float_mask(mask, x, dtype)
        x = ops.where(ops.expand_dims(m, -1) > 0, x, ops.zeros_like(x))
        x = self.input_norm(x)
        keys = self.project_k(x)  # [B, N, S]
        values = self.project_v(x)  # [B, N, S]

        batch = ops.shape(x)[0]
        mu = ops.cast(self.slots_mu, dtype)
        if training:
            noise = keras.random.normal((batch, k_slots, s), dtype=dtype, seed=self.seed_generator)
            slots = mu + ops.exp(ops.cast(self.slots_log_sigma, dtype)) * noise
        else:
            slots = ops.broadcast_to(mu, (batch, k_slots, s))

        scale = ops.cast(1.0 / math.sqrt(s), dtype)
        eps = ops.cast(self.epsilon, dtype)
        m3 = ops.expand_dims(m, -1)  # [B, N, 1]
        for _ in range(self.iterations):
            previous = slots
            q = self.project_q(self.slot_norm(slots)) * scale  # [B, K, S]
            logits = ops.einsum("bns,bks->bnk", keys, q)
            attn = (ops.softmax(logits, axis=-1) + eps) * m3
            total = ops.sum(attn, axis=1, keepdims=True)
            attn = attn / ops.where(total > 0, total, ops.ones_like(total))
            updates = ops.einsum("bnk,bns->bks", attn, values)
            new, _ = self.gru(
                ops.reshape(updates, (-1, s)), [ops.reshape(previous, (-1, s))], training=training
            )
            slots = ops.reshape(new, (-1, k_slots, s))
            slots = slots + self.mlp_output(self.mlp_hidden(self.mlp_norm(slots)))
        return slots

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_slots, self.slot_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_slots=self.num_slots,
            slot_size=self.slot_size,
            iterations=self.iterations,
            mlp_hidden_size=self.mlp_hidden_size,
            epsilon=self.epsilon,
            seed=self.seed,
        )
        return config
