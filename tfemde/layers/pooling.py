"""Masked set pooling: max, mean, and VSE-infinity's Generalized Pooling Operator (GPO)."""

import keras
from keras import ops

from tfemde.layers.masking import check_mask_shape, check_rank, float_mask, lowest
from tfemde.layers.positional import rank_positional_encoding
from tfemde.layers.recurrent import AveragedBiGRU

# VSE-infinity's fill value for padded features before sorting and for padded rank scores.
GPO_FILL = -1.0e4


def _checked_mask(inputs, mask, dtype):
    check_rank(inputs.shape, 3, "inputs", "[batch, length, dim]")
    if mask is not None:
        check_mask_shape(mask.shape, inputs.shape)
    return float_mask(mask, inputs, dtype)


class _MaskedPooling(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def compute_mask(self, inputs, previous_mask=None):
        return None

    def build(self, input_shape):
        check_rank(input_shape, 3, "inputs", "[batch, length, dim]")
        self.built = True

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="tfemde")
class MaskedMaxPooling(_MaskedPooling):
    """Per-dimension maximum over the valid elements of a set (DivE's image global feature).

    Call arguments:
        inputs: `[B, L, D]`.
        mask: optional `[B, L]` bool or 0/1; None means all valid.

    Returns:
        `[B, D]`; an all-padded row gives zeros.

    Example:
        >>> import numpy as np
        >>> x = np.array([[[1.0, -5.0], [3.0, -1.0], [9.0, 9.0]]], "float32")
        >>> MaskedMaxPooling()(x, mask=np.array([[1, 1, 0]])).numpy().tolist()
        [[3.0, -1.0]]
    """

    def call(self, inputs, mask=None):
        x = ops.cast(inputs, self.compute_dtype)
        m = ops.expand_dims(_checked_mask(x, mask, x.dtype), -1) > 0
        filled = ops.where(m, x, ops.full_like(x, lowest(x.dtype)))
        pooled = ops.max(filled, axis=1)
        return ops.where(ops.any(m, axis=1), pooled, ops.zeros_like(pooled))


@keras.saving.register_keras_serializable(package="tfemde")
class MaskedMeanPooling(_MaskedPooling):
    """Mean over the valid elements of a set.

    Call arguments:
        inputs: `[B, L, D]`.
        mask: optional `[B, L]` bool or 0/1; None means all valid.

    Returns:
        `[B, D]`; an all-padded row gives zeros.

    Example:
        >>> import numpy as np
        >>> x = np.array([[[1.0, -5.0], [3.0, -1.0], [9.0, 9.0]]], "float32")
        >>> MaskedMeanPooling()(x, mask=np.array([[1, 1, 0]])).numpy().tolist()
        [[2.0, -3.0]]
    """

    def call(self, inputs, mask=None):
        x = ops.cast(inputs, self.compute_dtype)
        m = ops.expand_dims(_checked_mask(x, mask, x.dtype), -1)
        total = ops.sum(ops.where(m > 0, x, ops.zeros_like(x)), axis=1)
        count = ops.sum(m, axis=1)
        return total / ops.maximum(count, ops.ones_like(count))


@keras.saving.register_keras_serializable(package="tfemde")
class GPO(_MaskedPooling):
    """VSE-infinity's Generalized Pooling Operator: a learned weighting of per-dimension sorted features.

    Follows `woodfrog/vse_infty` `lib/modules/aggr/gpo.py` (ALGORITHMS.md §1.1): each dimension
    of the valid features is sorted in descending order (padded entries are filled with -1e4
    before sorting and zeroed after); the rank positions 0..n-1 are encoded with sinusoids
    (`rank_positional_encoding`, zero at padded ranks) and fed to a bidirectional GRU whose
    backward direction starts at the last valid rank (as PyTorch's packed sequences); the two
    directions are averaged, a linear map without bias gives a score per rank, padded ranks get
    -1e4, and `softmax(score / temperature)` over ranks weights the sorted features.

    Any padding layout is accepted: the sort moves the n valid values of every dimension to
    ranks 0..n-1, so the rank mask is always right-padded, as the GRU requires.

    Args:
        d_pe: size of the rank positional encoding (32).
        gru_units: hidden size of each GRU direction (32).
        temperature: softmax temperature over ranks (0.1, fixed in the reference).
        rank_prior: `rank_prior · r` is subtracted from the score of rank r before the softmax (0, the reference:
            an untrained generator weights the ranks at random); with 0.1 an untrained GPO weights rank r by about
            e^-r, near max pooling, and learns from there.

    Call arguments:
        inputs: `[B, L, D]`.
        mask: optional `[B, L]` bool or 0/1; None means all valid.
        return_weights: also return the weights over ranks.

    Returns:
        `[B, D]` the pooled vector, not normalised (callers L2-normalise); with `return_weights`,
        also the `[B, L]` weights over ranks (zero at padded ranks). An all-padded row gives zeros.

    Example:
        >>> import numpy as np
        >>> gpo = GPO(d_pe=8, gru_units=4)
        >>> tuple(gpo(np.ones((2, 5, 6), "float32"), mask=np.ones((2, 5))).shape)
        (2, 6)
    """

    def __init__(self, d_pe=32, gru_units=32, temperature=0.1, rank_prior=0.0, **kwargs):
        super().__init__(**kwargs)
        if int(d_pe) < 1 or int(gru_units) < 1:
            raise ValueError(f"d_pe and gru_units must be positive ints; got d_pe={d_pe!r}, gru_units={gru_units!r}")
        if float(temperature) <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        if not float(rank_prior) >= 0:
            raise ValueError(f"rank_prior must be >= 0; got {rank_prior!r}")
        self.d_pe = int(d_pe)
        self.gru_units = int(gru_units)
        self.temperature = float(temperature)
        self.rank_prior = float(rank_prior)

    def build(self, input_shape):
        check_rank(input_shape, 3, "inputs", "[batch, length, dim]")
        policy = self.dtype_policy
        self.gru = AveragedBiGRU(self.gru_units, name="gru", dtype=policy)
        self.gru.build((None, None, self.d_pe))
        self.score = keras.layers.Dense(1, use_bias=False, name="score", dtype=policy)
        self.score.build((None, None, self.gru_units))
        self.built = True

    def call(self, inputs, mask=None, return_weights=False):
        dtype = self.compute_dtype
        x = ops.cast(inputs, dtype)
        m = _checked_mask(x, mask, dtype)
        length = ops.shape(x)[1]
        counts = ops.cast(ops.sum(m, axis=1, keepdims=True), "int32")  # [B, 1]
        rank_mask = ops.less(ops.expand_dims(ops.arange(length, dtype="int32"), 0), counts)  # [B, L]

        fill = ops.full_like(x, GPO_FILL)
        filled = ops.where(ops.expand_dims(m, -1) > 0, x, fill)
        ranked = ops.negative(ops.sort(ops.negative(filled), axis=1))  # descending per dimension
        ranked = ops.where(ops.expand_dims(rank_mask, -1), ranked, ops.zeros_like(ranked))

        pe = ops.expand_dims(rank_positional_encoding(length, self.d_pe, dtype=dtype), 0)
        pe = ops.where(ops.expand_dims(rank_mask, -1), pe, ops.zeros_like(pe))  # [B, L, d_pe]
        hidden = self.gru(pe, mask=rank_mask)
        # The sharp softmax runs in float32: -1e4 / 0.1 overflows float16 to -inf (NaN on an empty row).
        scores = ops.cast(ops.squeeze(self.score(hidden), -1), "float32")  # [B, L]
        if self.rank_prior:
            scores = scores - self.rank_prior * ops.expand_dims(ops.cast(ops.arange(length), "float32"), 0)
        scores = ops.where(rank_mask, scores, ops.full_like(scores, GPO_FILL))
        weights = ops.softmax(scores / self.temperature, axis=1)
        weights = ops.cast(weights * ops.cast(rank_mask, "float32"), dtype)  # zeros for an all-padded row
        pooled = ops.sum(ranked * ops.expand_dims(weights, -1), axis=1)
        if return_weights:
            return pooled, weights
        return pooled

    def compute_output_spec(self, inputs, mask=None, return_weights=False):
        check_rank(inputs.shape, 3, "inputs", "[batch, length, dim]")
        pooled = keras.KerasTensor((inputs.shape[0], inputs.shape[-1]), dtype=self.compute_dtype)
        if return_weights:
            return pooled, keras.KerasTensor(inputs.shape[:2], dtype=self.compute_dtype)
        return pooled

    def get_config(self):
        config = super().get_config()
        config.update(d_pe=self.d_pe, gru_units=self.gru_units, temperature=self.temperature,
                      rank_prior=self.rank_prior)
        return config
