"""DivE's set-prediction module (the "slot-attention variant"), ALGORITHMS.md §3.2."""

import math

import keras
from keras import ops

from tfemde.layers.activations import gelu_erf
from tfemde.layers.masking import check_mask_shape, check_rank, float_mask, mask_value
from tfemde.layers.normalization import l2_normalize
from tfemde.layers.positional import sine_positional_encoding

# PyTorch's LayerNorm epsilon; the Keras default (1e-3) would change the reference's numbers.
TORCH_LAYER_NORM_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="tfemde")
class SetPredictionBlock(keras.layers.Layer):
    """One block of DivE's set-prediction module: slot-competitive cross-attention, then a pre-norm FF.

    Args:
        dim: the query (slot) width `D`.
        num_heads: attention heads `H`.
        head_dim: width per head `E`.
        ff_mult: the FF hidden width is `ff_mult * D`.
        dropout: the dropout rate on the attention output and on the FF hidden layer.
        reference_masking: reproduce the reference's leaky masking (see `SetPrediction`).
        epsilon: added to the per-slot attention sum before normalising over inputs.
        layer_norm_epsilon: the epsilon of the three LayerNorms.

    Call arguments:
        queries: `[B, K, D]` the current slots.
        context: `[B, L, Din]` the local features.
        key_mask: `[B, L]` float 0./1. in the compute dtype.
        key_pos: optional `[B, L, Din]` positional encoding added to the keys only.
        training: enables dropout.

    Returns:
        `[B, K, D]` the updated slots.

    Example:
        >>> import numpy as np
        >>> block = SetPredictionBlock(dim=8, num_heads=2, head_dim=4)
        >>> block.build((None, 3, 8), (None, 5, 6))
        >>> out = block(np.zeros((2, 3, 8), "float32"), np.ones((2, 5, 6), "float32"), np.ones((2, 5), "float32"))
        >>> tuple(out.shape)
        (2, 3, 8)
    """

    def __init__(
        self,
        dim,
        num_heads,
        head_dim,
        ff_mult=4,
        dropout=0.1,
        reference_masking=False,
        epsilon=1e-7,
        layer_norm_epsilon=TORCH_LAYER_NORM_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.ff_mult = ff_mult
        self.dropout = float(dropout)
        self.reference_masking = bool(reference_masking)
        self.epsilon = float(epsilon)
        self.layer_norm_epsilon = float(layer_norm_epsilon)

    def build(self, queries_shape, context_shape, key_mask_shape=None, key_pos_shape=None):
        policy = self.dtype_policy
        h, e, d = self.num_heads, self.head_dim, self.dim
        ln = dict(epsilon=self.layer_norm_epsilon, dtype=policy)
        self.query_norm = keras.layers.LayerNormalization(name="query_norm", **ln)
        self.context_norm = keras.layers.LayerNormalization(name="context_norm", **ln)
        self.ff_norm = keras.layers.LayerNormalization(name="ff_norm", **ln)
        proj = dict(output_shape=(None, h, e), dtype=policy)
        self.query_proj = keras.layers.EinsumDense("bkd,dhe->bkhe", name="query_proj", **proj)
        self.key_proj = keras.layers.EinsumDense("bld,dhe->blhe", name="key_proj", **proj)
        self.value_proj = keras.layers.EinsumDense("bld,dhe->blhe", name="value_proj", **proj)
        self.output_proj = keras.layers.EinsumDense(
            "bkhe,hed->bkd", output_shape=(None, d), bias_axes="d", name="output_proj", dtype=policy
        )
        self.attention_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.ff_hidden = keras.layers.Dense(int(self.ff_mult * d), name="ff_hidden", dtype=policy)
        self.ff_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        self.ff_output = keras.layers.Dense(d, name="ff_output", dtype=policy)

        queries_shape, context_shape = tuple(queries_shape), tuple(context_shape)
        self.query_norm.build(queries_shape)
        self.context_norm.build(context_shape)
        self.ff_norm.build(queries_shape)
        self.query_proj.build(queries_shape)
        self.key_proj.build(context_shape)
        self.value_proj.build(context_shape)
        self.output_proj.build(queries_shape[:-1] + (h, e))
        self.ff_hidden.build(queries_shape)
        self.ff_output.build(queries_shape[:-1] + (int(self.ff_mult * d),))
        self.built = True

    def call(self, queries, context, key_mask, key_pos=None, training=None):
        keys_t, values = self.project_context(context, key_pos)
        return self.attend(queries, keys_t, values, key_mask, training=training)

    # The projections are 2-D matmuls on the EinsumDense kernels rather than the layers' own einsums: Keras lowers
    # `bkd,dhe->bkhe` on TensorFlow to a BatchMatMul broadcasting the kernel over the batch, whose kernel gradient
    # materialises a [B, D, H*E] tensor and sums it (about 10x slower than the matmul). Same weights, same maths.
    def _split_heads(self, x):
        """`[B, N, H*E]` -> `[B, H, N, E]`."""
        shape = ops.shape(x)
        return ops.transpose(ops.reshape(x, (shape[0], shape[1], self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def project_queries(self, queries):
        """Multi-head queries `[B, H, K, E]` of the slots `[B, K, D]`: `LN_q(x) W_q`."""
        kernel = ops.reshape(self.query_proj.kernel, (self.dim, self.num_heads * self.head_dim))
        return self._split_heads(ops.matmul(self.query_norm(queries), kernel))

    def project_context(self, context, key_pos=None):
        """Transposed keys `[B, H, E, L]` and values `[B, H, L, E]` of the context `[B, L, Din]`.

        `k = (LN_c(C) + key_pos) W_k`, `v = LN_c(C) W_v`. They do not depend on the slots, so with shared weights
        `SetPrediction` computes them once for all its blocks.
        """
        normed = self.context_norm(context)
        inner = self.num_heads * self.head_dim
        key_kernel = ops.reshape(self.key_proj.kernel, (-1, inner))
        value_kernel = ops.reshape(self.value_proj.kernel, (-1, inner))
        keys = self._split_heads(ops.matmul(normed if key_pos is None else normed + key_pos, key_kernel))
        values = self._split_heads(ops.matmul(normed, value_kernel))
        return ops.transpose(keys, (0, 1, 3, 2)), values

    def attend(self, queries, keys_t, values, key_mask, training=None, projected_queries=None):
        """The block's update of the slots `[B, K, D]` given `project_context`'s keys and values.

        `projected_queries` `[B or 1, H, K, E]`, when given, replaces `project_queries(queries)` (the first block's
        slots are the same learned queries for every sample, so they are projected once).
        """
        q = self.project_queries(queries) if projected_queries is None else projected_queries
        logits = ops.matmul(q, keys_t) * ops.cast(1.0 / math.sqrt(self.head_dim), q.dtype)  # [B, H, K, L]
        m = ops.cast(key_mask, logits.dtype)[:, None, None, :]
        if self.reference_masking:
            # The reference's behaviour: a masked key gets the same logit in every slot, so the
            # slot softmax gives it 1/K everywhere and it still feeds every slot (the leak).
            logits = ops.where(m > 0, logits, ops.cast(mask_value(logits.dtype), logits.dtype))
            attn = ops.softmax(logits, axis=2)
        else:
            # The fix: padded keys get zero weight after the slot softmax, before normalising
            # over inputs, so they reach no slot; an all-padded row gives zero updates.
            attn = ops.softmax(logits, axis=2) * m
        attn = attn / (ops.sum(attn, axis=-1, keepdims=True) + ops.cast(self.epsilon, attn.dtype))
        updates = ops.transpose(ops.matmul(attn, values), (0, 2, 1, 3))  # [B, K, H, E]
        shape = ops.shape(updates)
        updates = ops.reshape(updates, (shape[0], shape[1], self.num_heads * self.head_dim))
        output_kernel = ops.reshape(self.output_proj.kernel, (self.num_heads * self.head_dim, self.dim))
        projected = ops.matmul(updates, output_kernel) + self.output_proj.bias
        x = queries + self.attention_dropout(projected, training=training)
        hidden = self.ff_dropout(gelu_erf(self.ff_hidden(self.ff_norm(x))), training=training)
        return x + self.ff_output(hidden)

    def get_config(self):
        config = super().get_config()
        config.update(
            dim=self.dim,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            ff_mult=self.ff_mult,
            dropout=self.dropout,
            reference_masking=self.reference_masking,
            epsilon=self.epsilon,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="tfemde")
class SetPrediction(keras.layers.Layer):
    """DivE's set-prediction module: K learned slot queries attend to local features; a set of K unit vectors.

    Follows `kdwonn/DivE` (ALGORITHMS.md §3.2): learned queries Q0 `[K, D]` ~ N(0, 1); `depth` blocks
    of pre-norm multi-head cross-attention whose softmax runs over the **slot** axis and is then
    normalised over the inputs, with an output projection, dropout and residual, followed by a
    pre-norm FF (D -> ff_mult·D -> D, erf-GELU, dropout) with residual; a final LayerNorm gives
    the residual set r; the output is `S = LN_g(global) + r` (or `r`), each element L2-normalised.

    Deviations from the reference, on purpose:
      * Masking (default): padded inputs are removed *after* the slot softmax and the weights are
        renormalised over valid inputs, so padded inputs reach no slot whatever they hold. The
        reference masks logits before the slot softmax, which leaves each padded input with weight
        1/K in every slot; `reference_masking=True` reproduces that for parity.
      * The text positional encoding (`positional_encoding=True`) is normalised by each sample's
        true length, not the padded batch length, and is zero at padded positions.
      * LayerNorm epsilon is PyTorch's 1e-5; weights use Keras initialisers (glorot), except Q0.

    Args:
        num_slots: K, the set size.
        dim: D, the slot and output width; `global_features` must have this width.
        depth: T, the number of blocks.
        num_heads: H.
        head_dim: width per head; default `2 * dim // num_heads` (the reference's 4 × 512 at D = 1024).
        ff_mult: FF hidden width multiplier.
        dropout: dropout rate on the attention output and on the FF hidden layer.
        share_weights: reuse one block's weights for all T blocks (DivE) instead of T sets.
        positional_encoding: add the sine encoding (`sine_positional_encoding`) to the keys (text).
        global_residual: output `LN_g(global) + r` instead of `r`.
        reference_masking: reproduce the reference's leaky masking (see above).
        epsilon: added to the per-slot attention sum before normalising over inputs (1e-7, DivE).

    Call arguments:
        local_features: `[B, L, Din]`; Din may differ from D.
        global_features: `[B, D]`; may be None only when `global_residual=False`.
        mask: optional `[B, L]` bool or 0/1; None means all valid.
        training: enables dropout.
        return_residual: also return the L2-normalised residual set r (used by the diversity loss).

    Returns:
        `[B, K, D]` unit vectors, or the pair (`[B, K, D]` set, `[B, K, D]` normalised r).

    Example:
        >>> import numpy as np
        >>> spm = SetPrediction(num_slots=2, dim=8, depth=2, num_heads=2)
        >>> out = spm(np.ones((3, 5, 6), "float32"), np.ones((3, 8), "float32"), mask=np.ones((3, 5)))
        >>> tuple(out.shape)
        (3, 2, 8)
    """

    def __init__(
        self,
        num_slots=4,
        dim=1024,
        depth=4,
        num_heads=4,
        head_dim=None,
        ff_mult=4,
        dropout=0.1,
        share_weights=True,
        positional_encoding=False,
        global_residual=True,
        reference_masking=False,
        epsilon=1e-7,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("num_slots", num_slots), ("dim", dim), ("depth", depth), ("num_heads", num_heads)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.num_slots = int(num_slots)
        self.dim = int(dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.head_dim = None if head_dim is None else int(head_dim)
        self.ff_mult = ff_mult
        self.dropout = float(dropout)
        self.share_weights = bool(share_weights)
        self.positional_encoding = bool(positional_encoding)
        self.global_residual = bool(global_residual)
        self.reference_masking = bool(reference_masking)
        self.epsilon = float(epsilon)
        # The mask is consumed here (the output is a set of K slots, not of L inputs).
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask=None):
        return None

    @property
    def effective_head_dim(self):
        return self.head_dim if self.head_dim is not None else max(1, (2 * self.dim) // self.num_heads)

    def _check_shapes(self, local_shape, global_shape, mask_shape=None):
        check_rank(local_shape, 3, "local_features", "[batch, length, in_dim]")
        if global_shape is None:
            if self.global_residual:
                raise ValueError(
                    "global_features must be given (shape [batch, dim]) when global_residual=True; got None"
                )
        else:
            check_rank(global_shape, 2, "global_features", "[batch, dim]")
            if global_shape[-1] is not None and global_shape[-1] != self.dim:
                raise ValueError(
                    f"global_features must have shape [batch, dim={self.dim}]; got shape {tuple(global_shape)}"
                )
        if local_shape[-1] is None:
            raise ValueError(f"local_features must have a known last dimension; got shape {tuple(local_shape)}")
        if mask_shape is not None:
            check_mask_shape(mask_shape, local_shape)

    def build(self, local_features_shape, global_features_shape=None):
        self._check_shapes(local_features_shape, global_features_shape)
        k, d = self.num_slots, self.dim
        self.slot_queries = self.add_weight(
            shape=(k, d), initializer=keras.initializers.RandomNormal(0.0, 1.0), name="slot_queries"
        )
        n_sets = 1 if self.share_weights else self.depth
        self.blocks = [
            SetPredictionBlock(
                d,
                self.num_heads,
                self.effective_head_dim,
                ff_mult=self.ff_mult,
                dropout=self.dropout,
                reference_masking=self.reference_masking,
                epsilon=self.epsilon,
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(n_sets)
        ]
        for block in self.blocks:
            block.build((None, k, d), tuple(local_features_shape))
        ln = dict(epsilon=TORCH_LAYER_NORM_EPSILON, dtype=self.dtype_policy)
        self.final_norm = keras.layers.LayerNormalization(name="final_norm", **ln)
        self.final_norm.build((None, k, d))
        if self.global_residual:
            self.global_norm = keras.layers.LayerNormalization(name="global_norm", **ln)
            self.global_norm.build((None, d))
        self.built = True

    def call(self, local_features, global_features=None, mask=None, training=None, return_residual=False):
        self._check_shapes(
            local_features.shape,
            None if global_features is None else global_features.shape,
            None if mask is None else mask.shape,
        )
        dtype = self.compute_dtype
        context = ops.cast(local_features, dtype)
        m = float_mask(mask, context, dtype)
        if not self.reference_masking:
            # Padded inputs are replaced before any arithmetic, so even inf/NaN there changes nothing.
            context = ops.where(ops.expand_dims(m, -1) > 0, context, ops.zeros_like(context))
        key_pos = None
        if self.positional_encoding:
            key_pos = sine_positional_encoding(m, dim=int(local_features.shape[-1]), dtype=dtype)
        slots = ops.expand_dims(ops.cast(self.slot_queries, dtype), 0)  # [1, K, D]
        x = ops.broadcast_to(slots, (ops.shape(context)[0], self.num_slots, self.dim))
        # Exact shortcuts: with shared weights the context LayerNorm and the key/value projections are the same in
        # every block, so they are computed once; the first block's slots are the same for every sample, so their
        # query projection is computed once and broadcast.
        shared_context = self.blocks[0].project_context(context, key_pos) if self.share_weights else None
        for t in range(self.depth):
            block = self.blocks[0 if self.share_weights else t]
            keys_t, values = shared_context if shared_context is not None else block.project_context(context, key_pos)
            first_queries = block.project_queries(slots) if t == 0 else None
            x = block.attend(x, keys_t, values, m, training=training, projected_queries=first_queries)
        residual = self.final_norm(x)
        out = residual
        if self.global_residual:
            out = ops.expand_dims(self.global_norm(ops.cast(global_features, dtype)), 1) + residual
        out = l2_normalize(out)
        if return_residual:
            return out, l2_normalize(residual)
        return out

    def compute_output_spec(
        self, local_features, global_features=None, mask=None, training=None, return_residual=False
    ):
        self._check_shapes(
            local_features.shape,
            None if global_features is None else global_features.shape,
            None if mask is None else mask.shape,
        )
        out = keras.KerasTensor((local_features.shape[0], self.num_slots, self.dim), dtype=self.compute_dtype)
        if return_residual:
            return out, keras.KerasTensor(out.shape, dtype=self.compute_dtype)
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            num_slots=self.num_slots,
            dim=self.dim,
            depth=self.depth,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            ff_mult=self.ff_mult,
            dropout=self.dropout,
            share_weights=self.share_weights,
            positional_encoding=self.positional_encoding,
            global_residual=self.global_residual,
            reference_masking=self.reference_masking,
            epsilon=self.epsilon,
        )
        return config
