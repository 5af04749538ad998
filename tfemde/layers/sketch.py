"""T-EMDE: a trainable, linear-time density sketch of a token or region set (ALGORITHMS.md §4, §5.3)."""

import keras
import numpy as np
from keras import ops

from tfemde.layers.masking import check_mask_shape, check_rank, float_mask
from tfemde.layers.normalization import l2_normalize


LAYER_NORM_EPSILON = 1e-5


def _code_table(bits):
    """The binary code table C [2**bits, bits]: C[w, k] = bit k of w, so bucket w = sum_k C[w, k] 2**k."""
    buckets = np.arange(2**bits)[:, None]
    return ((buckets >> np.arange(bits)[None, :]) & 1).astype("float32")


@keras.saving.register_keras_serializable(package="tfemde")
class TEMDESketch(keras.layers.Layer):
    """T-EMDE sketch: a soft density-dependent LSH histogram of a set of vectors.

    Each of `depth` independent partitionings cuts the (standardised) input space with `bits` hyperplanes into
    `W = 2**bits` buckets. A token falls in bucket `w = sum_k beta_k 2**k` with `beta_k = 1[z_k > 0]`, where
    `z = ((x - mean) / std) @ hyperplanes - biases`. The soft assignment is the factorised Bernoulli product
    `P[w] = prod_k sigmoid(+-z_k / temperature)` (the sign given by bit k of w), which equals
    `softmax_w(1/2 sum_k (2 C[w, k] - 1) z_k / temperature)`; it is computed in log space with log-sigmoids.
    As the temperature goes to 0 it becomes the one-hot of the EMDE code; `hard=True` uses that one-hot exactly.
    The sketch of a set is the masked (and optionally weighted) sum of its tokens' assignments, a histogram with
    one row per partitioning, then optionally L2-normalised per row (EMDE's input normalisation).

    Cost and memory are linear in the number of tokens: O(L * (D * depth * bits + depth * 2**bits)).

    With `standardize=True`, `hard=True` and the weights set by `adapt` and then frozen, the layer is the original
    EMDE coder for precomputed embeddings (StandardScaler, random projection, median biases; with `log2 W`
    hyperplanes per partitioning, see ALGORITHMS.md §4.1 for why that is the same family of partitions).

    Mixed precision: the layer always computes in float32 (its weights are float32 and never autocast) and returns
    float32, whatever its compute dtype: counts above 2048 are not exact in float16, and the sketch feeds a float32
    similarity. The `hard=True` output has no gradient with respect to the hyperplanes and biases.

    Args:
        depth: N, the number of independent partitionings (rows of the sketch).
        bits: K, hyperplanes per partitioning; each row has `2**bits` buckets (1 <= bits <= 16).
        temperature: initial value of the (non-trainable) temperature dividing z; lower is harder. It is stored
            as the weight `temperature_weight`, so a callback may anneal it with
            `layer.temperature_weight.assign(t)` without retracing.
        normalize: L2-normalise each row of the sketch (with `epsilon`).
        hard: use exact one-hot codes instead of the soft assignment (no gradient to the hyperplanes).
        standardize: subtract the non-trainable per-feature `mean` and divide by `std` (set by `adapt`)
            before projecting, as EMDE's StandardScaler. Initialised to 0 and 1 (identity).
        layer_norm: first standardise each token over its features, `(x - mean(x)) / sqrt(var(x) + 1e-5)`
            (a LayerNorm without gain and bias, which the hyperplanes and biases already provide). Features that
            train (a tower's output) have no fixed scale; unnormalised, a small scale puts every token in every
            bucket alike (`z` near 0) and the sketch carries nothing. Applied in `adapt` too.
        epsilon: rows are divided by `sqrt(max(||row||**2, epsilon**2))`.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[B, L, D]` token or region features.
        mask: optional `[B, L]`, bool or 0/1; padded tokens change nothing whatever they hold. `None` = all valid.
        token_weights: optional `[B, L]` non-negative per-token weights (counts, time decay); default 1.

    Returns:
        `[B, depth, 2**bits]` float32 sketch. With `normalize=False` each row sums to the number of valid tokens
        (the sum of their weights); a fully padded set gives zeros.

    Example:
        >>> import numpy as np
        >>> tokens = np.random.default_rng(0).normal(size=(2, 7, 32)).astype("float32")
        >>> mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
        >>> layer = TEMDESketch(depth=4, bits=3)
        >>> layer.adapt(tokens, mask=mask)  # EMDE's data-dependent initialisation
        <TEMDESketch name=temde_sketch, built=True>
        >>> sketch = layer(tokens, mask=mask)
        >>> tuple(sketch.shape), tuple(sketch_similarity(sketch, sketch).shape)
        ((2, 4, 8), (2, 2))
    """

    def __init__(
        self,
        depth,
        bits,
        temperature=1.0,
        normalize=True,
        hard=False,
        standardize=True,
        layer_norm=False,
        epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(depth) != depth or depth < 1:
            raise ValueError(f"depth must be a positive integer; got {depth!r}")
        if int(bits) != bits or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an integer in [1, 16]; got {bits!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0; got {epsilon!r}")
        self.depth = int(depth)
        self.bits = int(bits)
        self.temperature = float(temperature)
        self.normalize = bool(normalize)
        self.hard = bool(hard)
        self.standardize = bool(standardize)
        self.layer_norm = bool(layer_norm)
        self.epsilon = float(epsilon)
        self.width = 2**self.bits
        self.input_dim = None

    def build(self, input_shape):
        check_rank(input_shape, 3, "inputs", "[batch, length, dim]")
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(f"inputs must have a known last dimension (dim); got shape {tuple(input_shape)}")
        self.input_dim = int(dim)
        # Weights are float32 and not autocast: the layer computes in float32 under mixed precision.
        self.hyperplanes = self.add_weight(
            name="hyperplanes",
            shape=(self.input_dim, self.depth * self.bits),
            initializer=keras.initializers.RandomNormal(stddev=1.0 / np.sqrt(self.input_dim)),
            trainable=True,
            dtype="float32",
            autocast=False,
        )
        self.biases = self.add_weight(
            name="biases",
            shape=(self.depth * self.bits,),
            initializer="zeros",
            trainable=True,
            dtype="float32",
            autocast=False,
        )
        if self.standardize:
            self.mean = self.add_weight(
                name="mean", shape=(self.input_dim,), initializer="zeros", trainable=False,
                dtype="float32", autocast=False,
            )
            self.std = self.add_weight(
                name="std", shape=(self.input_dim,), initializer="ones", trainable=False,
                dtype="float32", autocast=False,
            )
        self.temperature_weight = self.add_weight(
            name="temperature",
            shape=(),
            initializer=keras.initializers.Constant(self.temperature),
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        # C [W, K] and 1 - C transposed for the log-space product; constants, not weights.
        self._one_minus_code_t = np.ascontiguousarray(1.0 - _code_table(self.bits).T)
        self._powers = (2.0 ** np.arange(self.bits)).astype("float32")

    def _check_inputs(self, inputs, mask, token_weights):
        check_rank(inputs.shape, 3, "inputs", "[batch, length, dim]")
        if inputs.shape[-1] is not None and inputs.shape[-1] != self.input_dim:
            raise ValueError(
                f"inputs must have shape [batch, length, {self.input_dim}] (the dim the layer was built with); "
                f"got shape {tuple(inputs.shape)}"
            )
        if mask is not None:
            check_mask_shape(mask.shape, inputs.shape, "mask")
        if token_weights is not None:
            check_mask_shape(token_weights.shape, inputs.shape, "token_weights")

    def _token_norm(self, x):
        """Each token standardised over its features when `layer_norm=True`, else `x`."""
        if not self.layer_norm:
            return x
        centred = x - ops.mean(x, axis=-1, keepdims=True)
        return centred * ops.rsqrt(ops.mean(ops.square(centred), axis=-1, keepdims=True) + LAYER_NORM_EPSILON)

    def _projections(self, x):
        """`((LN(x) - mean) / std) @ hyperplanes - biases` for float32 `x [..., D]` -> `[..., depth * bits]`."""
        x = self._token_norm(x)
        if self.standardize:
            x = (x - self.mean) / self.std
        return ops.matmul(x, self.hyperplanes) - self.biases

    def call(self, inputs, mask=None, token_weights=None):
        inputs = ops.convert_to_tensor(inputs)
        if mask is not None:
            mask = ops.convert_to_tensor(mask)
        if token_weights is not None:
            token_weights = ops.convert_to_tensor(token_weights)
        self._check_inputs(inputs, mask, token_weights)

        x = ops.cast(inputs, "float32")
        valid = float_mask(mask, x)  # [B, L]
        # Zero padded tokens first so that inf/NaN padding cannot leak through 0 * inf.
        x = ops.where(ops.expand_dims(valid, -1) > 0, x, ops.zeros_like(x))
        weights = valid if token_weights is None else valid * ops.cast(token_weights, "float32")

        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        z = self._projections(x) / self.temperature_weight
        z = ops.reshape(z, (batch, length, self.depth, self.bits))  # [B, L, N, K]

        if self.hard:
            bits_on = ops.cast(z > 0, "float32")
            codes = ops.cast(ops.sum(bits_on * self._powers, axis=-1), "int32")  # [B, L, N]
            assignment = ops.one_hot(codes, self.width, dtype="float32")  # [B, L, N, W]
        else:
            # log P[w] = sum_k log sigmoid(z_k) - sum_k (1 - C[w, k]) z_k, since log sigmoid(-z) = log sigmoid(z) - z.
            log_p = ops.sum(ops.log_sigmoid(z), axis=-1, keepdims=True) - ops.matmul(z, self._one_minus_code_t)
            assignment = ops.exp(log_p)  # [B, L, N, W], rows sum to 1

        # The masked sum over tokens as one batched matmul [B, 1, L] x [B, L, N*W] (faster than an einsum on TF).
        flat = ops.reshape(assignment, (batch, length, self.depth * self.width))
        sketch = ops.reshape(ops.matmul(ops.expand_dims(weights, 1), flat), (batch, self.depth, self.width))
        if self.normalize:
            sketch = l2_normalize(sketch, epsilon=self.epsilon)
        return sketch

    def compute_mask(self, inputs, previous_mask):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.depth, self.width)

    def compute_output_spec(self, inputs, mask=None, token_weights=None):
        return keras.KerasTensor((inputs.shape[0], self.depth, self.width), dtype="float32")

    def adapt(self, samples, mask=None):
        """Fit EMDE's data-dependent parameters on sample vectors (NumPy, once, outside the graph).

        Sets `mean`/`std` to the per-feature mean and (population) standard deviation of the valid samples when
        `standardize=True` (features with zero variance get std 1, as sklearn's StandardScaler), then the
        `biases` to the medians of the projections, so that every hyperplane splits the samples 50/50 (EMDE's
        density-dependent split). The hyperplanes are left as they are.

        Args:
            samples: `[N, D]` vectors, or `[B, L, D]` token sets (NumPy or tensor).
            mask: optional `[B, L]` (bool or 0/1) for `[B, L, D]` samples, or `[N]` for `[N, D]` samples.

        Returns:
            The layer (for chaining).
        """
        samples = np.asarray(ops.convert_to_numpy(samples), dtype="float64")
        if samples.ndim not in (2, 3):
            raise ValueError(
                f"samples must have shape [num_samples, dim] or [batch, length, dim]; got shape {samples.shape}"
            )
        if mask is not None:
            mask = np.asarray(ops.convert_to_numpy(mask))
            if mask.shape != samples.shape[:-1]:
                layout = "[batch, length]" if samples.ndim == 3 else "[num_samples]"
                raise ValueError(
                    f"mask must have shape {layout} = {samples.shape[:-1]} to match the samples; got shape {mask.shape}"
                )
            samples = samples[mask != 0]
        samples = samples.reshape(-1, samples.shape[-1])
        if not self.built:
            self.build((None, None, samples.shape[-1]))
        if samples.shape[-1] != self.input_dim:
            raise ValueError(
                f"samples must have last dimension {self.input_dim} (the dim the layer was built with); "
                f"got shape {samples.shape}"
            )
        if samples.shape[0] == 0:
            raise ValueError("samples must contain at least one valid vector; got none (all masked or empty)")
        if self.layer_norm:
            samples = np.asarray(self._token_norm(samples), dtype="float64")
        if self.standardize:
            mean = samples.mean(axis=0)
            std = samples.std(axis=0)
            std = np.where(std > 0, std, 1.0)
            self.mean.assign(mean.astype("float32"))
            self.std.assign(std.astype("float32"))
            samples = (samples - mean) / std
        hyperplanes = np.asarray(self.hyperplanes.numpy(), dtype="float64")
        self.biases.assign(np.median(samples @ hyperplanes, axis=0).astype("float32"))
        return self

    def get_config(self):
        config = super().get_config()
        config.update(
            depth=self.depth,
            bits=self.bits,
            temperature=self.temperature,
            normalize=self.normalize,
            hard=self.hard,
            standardize=self.standardize,
            layer_norm=self.layer_norm,
            epsilon=self.epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="tfemde")
def sketch_similarity(a, b, epsilon=1e-6):
    """Global similarity of two batches of sketches: the mean over partitionings of the row cosines.

    `s[i, j] = 1/N sum_n <a[i, n] / ||a[i, n]||, b[j, n] / ||b[j, n]||>`. Rows are normalised inside (as
    `x / sqrt(max(||x||**2, epsilon**2))`), so unnormalised sketches work and empty rows contribute 0.
    Computed in float32.

    Args:
        a: `[Ba, N, W]` sketches.
        b: `[Bb, N, W]` sketches with the same N and W.
        epsilon: the row-norm floor.

    Returns:
        `[Ba, Bb]` float32 similarities in [-1, 1] ([0, 1] for histograms).

    Example:
        >>> import numpy as np
        >>> a = np.random.default_rng(0).uniform(size=(3, 4, 8)).astype("float32")
        >>> np.round(np.diag(np.asarray(sketch_similarity(a, a))), 4)
        array([1., 1., 1.], dtype=float32)
    """
    a = ops.cast(ops.convert_to_tensor(a), "float32")
    b = ops.cast(ops.convert_to_tensor(b), "float32")
    check_rank(a.shape, 3, "a", "[batch_a, depth, width]")
    check_rank(b.shape, 3, "b", "[batch_b, depth, width]")
    for axis, name in ((1, "depth"), (2, "width")):
        if a.shape[axis] is not None and b.shape[axis] is not None and a.shape[axis] != b.shape[axis]:
            raise ValueError(
                f"a and b must have the same {name} (axis {axis}); got shapes {tuple(a.shape)} and {tuple(b.shape)}"
            )
    depth = ops.cast(ops.shape(a)[1], "float32")
    return ops.einsum("anw,bnw->ab", l2_normalize(a, epsilon=epsilon), l2_normalize(b, epsilon=epsilon)) / depth
