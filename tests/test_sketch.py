"""TEMDESketch and sketch_similarity against independent NumPy re-derivations (ALGORITHMS.md §4.1-4.2, §5.3)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfemde.layers.sketch import TEMDESketch, sketch_similarity
from helpers import keras_round_trip

B, L, D, N, K = 3, 6, 8, 4, 3
W = 2**K


# ---------------------------------------------------------------- NumPy reference


def np_projections(x, layer):
    """z = ((x - mean) / std) R - b, reshaped [..., N, K], with the layer's weights read back as NumPy."""
    x = np.asarray(x, "float64")
    if layer.layer_norm:
        centred = x - x.mean(axis=-1, keepdims=True)
        x = centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + 1e-5)
    if layer.standardize:
        x = (x - layer.mean.numpy()) / layer.std.numpy()
    z = x @ layer.hyperplanes.numpy().astype("float64") - layer.biases.numpy()
    return z.reshape(x.shape[:-1] + (layer.depth, layer.bits))


def np_sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def np_assignment(z, hard):
    """[..., N, K] -> [..., N, W]: product of sigmoids over the code table, or the one-hot of the sign code."""
    bits = z.shape[-1]
    out = np.ones(z.shape[:-1] + (2**bits,))
    for w in range(2**bits):
        for k in range(bits):
            bit = (w >> k) & 1
            if hard:
                out[..., w] *= (z[..., k] > 0) == bit
            else:
                out[..., w] *= np_sigmoid(z[..., k]) if bit else np_sigmoid(-z[..., k])
    return out


def np_sketch(x, layer, mask=None, token_weights=None, temperature=None, hard=None, normalize=None):
    temperature = layer.temperature_weight.numpy() if temperature is None else temperature
    hard = layer.hard if hard is None else hard
    normalize = layer.normalize if normalize is None else normalize
    mask = np.ones(x.shape[:2]) if mask is None else (np.asarray(mask) != 0).astype("float64")
    x = np.where(mask[..., None] > 0, x, 0.0)
    weights = mask if token_weights is None else mask * token_weights
    p = np_assignment(np_projections(x, layer) / temperature, hard)
    sketch = (weights[:, :, None, None] * p).sum(axis=1)
    if normalize:
        norms = np.sqrt((sketch**2).sum(-1, keepdims=True))
        sketch = sketch / np.maximum(norms, layer.epsilon)
    return sketch


def randomize(layer, rng, scale=1.0):
    """Random non-trivial values for every weight, so the reference is checked beyond the init."""
    layer.hyperplanes.assign(rng.normal(scale=scale, size=layer.hyperplanes.shape).astype("float32"))
    layer.biases.assign(rng.normal(scale=0.3, size=layer.biases.shape).astype("float32"))
    if layer.standardize:
        layer.mean.assign(rng.normal(size=layer.mean.shape).astype("float32"))
        layer.std.assign(rng.uniform(0.5, 2.0, size=layer.std.shape).astype("float32"))


def make(rng, **kwargs):
    kwargs.setdefault("depth", N)
    kwargs.setdefault("bits", K)
    layer = TEMDESketch(**kwargs)
    layer.build((None, None, D))
    randomize(layer, rng)
    return layer


@pytest.fixture
def data(rng):
    x = rng.normal(size=(B, L, D)).astype("float32")
    mask = np.array([[1] * L, [1] * 4 + [0] * (L - 4), [1] + [0] * (L - 1)], dtype="int32")
    return x, mask


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("standardize", [True, False])
def test_soft_matches_numpy(rng, data, normalize, standardize):
    x, mask = data
    layer = make(rng, temperature=0.7, normalize=normalize, standardize=standardize)
    out = layer(x, mask=mask)
    assert out.shape == (B, N, W) and out.dtype == "float32"
    np.testing.assert_allclose(out.numpy(), np_sketch(x, layer, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("standardize", [True, False])
def test_layer_norm_matches_numpy_and_ignores_each_tokens_scale_and_offset(rng, data, standardize):
    """With layer_norm=True a token's sketch depends on its direction after centring, not its scale: a tower whose
    features shrink (tanh states of a GRU) still spreads its tokens over the buckets."""
    x, mask = data
    layer = make(rng, temperature=0.7, layer_norm=True, standardize=standardize)
    np.testing.assert_allclose(layer(x, mask=mask).numpy(), np_sketch(x, layer, mask), rtol=1e-4, atol=1e-5)
    scale = rng.uniform(0.5, 20.0, size=(B, L, 1)).astype("float32")
    shift = rng.normal(size=(B, L, 1)).astype("float32")
    np.testing.assert_allclose(layer(x * scale + shift, mask=mask).numpy(), layer(x, mask=mask).numpy(),
                               rtol=1e-4, atol=1e-5)
    plain = make(rng, temperature=0.7, standardize=standardize)
    assert not np.allclose(plain(0.01 * x, mask=mask).numpy(), plain(x, mask=mask).numpy(), atol=1e-3)
    # tokens of a small scale at the initial weights: without the norm every bucket gets about the same mass, with
    # it they do not
    small = 0.01 * rng.normal(size=(1, 64, D)).astype("float32")
    plain = TEMDESketch(depth=N, bits=K, standardize=standardize)
    flat = plain(small).numpy()
    np.testing.assert_allclose(flat, np.full_like(flat, 1.0 / np.sqrt(W)), atol=1e-3)
    normed = TEMDESketch(depth=N, bits=K, layer_norm=True, standardize=standardize)
    normed.build((None, None, D))
    normed.hyperplanes.assign(plain.hyperplanes.numpy())
    assert np.abs(normed(small).numpy() - 1.0 / np.sqrt(W)).max() > 0.05


def test_hard_is_one_hot_sign_code(rng, data):
    x, _ = data
    layer = make(rng, hard=True, normalize=False)
    single = layer(x.reshape(B * L, 1, D)).numpy()  # one token per set -> the token's one-hot per row
    assert set(np.unique(single)) <= {0.0, 1.0}
    np.testing.assert_array_equal(single.sum(-1), np.ones((B * L, N)))
    z = np_projections(x.reshape(B * L, D), layer)
    codes = ((z > 0) * 2 ** np.arange(K)).sum(-1)  # [B*L, N], bit k <-> hyperplane k
    np.testing.assert_array_equal(single.argmax(-1), codes)


@pytest.mark.parametrize("normalize", [True, False])
def test_hard_histogram_matches_numpy(rng, data, normalize):
    x, mask = data
    layer = make(rng, hard=True, normalize=normalize)
    np.testing.assert_allclose(layer(x, mask=mask).numpy(), np_sketch(x, layer, mask), rtol=1e-5, atol=1e-6)


def test_small_temperature_approaches_hard(rng, data):
    x, mask = data
    soft = make(rng, normalize=False)
    z = np_projections(x, soft)
    assert np.abs(z).min() > 1e-3  # no token on a hyperplane, so the limit is well defined
    hard = np_sketch(x, soft, mask, hard=True, normalize=False)
    errors = []
    for temperature in (1.0, 1e-2, 1e-5):
        soft.temperature_weight.assign(temperature)
        errors.append(np.abs(soft(x, mask=mask).numpy() - hard).max())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_token_weights(rng, data):
    x, mask = data
    layer = make(rng, normalize=False)
    weights = rng.uniform(0.0, 2.0, size=(B, L)).astype("float32")
    out = layer(x, mask=mask, token_weights=weights).numpy()
    np.testing.assert_allclose(out, np_sketch(x, layer, mask, token_weights=weights), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.sum(-1), np.repeat((weights * mask).sum(1, keepdims=True), N, 1), rtol=1e-5)


# ---------------------------------------------------------------- histogram properties and masking


@pytest.mark.parametrize("hard", [False, True])
def test_histogram_properties(rng, data, hard):
    x, mask = data
    layer = make(rng, hard=hard, normalize=False)
    out = layer(x, mask=mask).numpy()
    np.testing.assert_allclose(out.sum(-1), np.repeat(mask.sum(1, keepdims=True), N, 1), rtol=1e-5)
    # additive over disjoint token sets
    first, second = layer(x[:, :2]).numpy(), layer(x[:, 2:]).numpy()
    np.testing.assert_allclose(layer(x).numpy(), first + second, rtol=1e-5, atol=1e-6)
    # permutation invariant (tokens and mask permuted together)
    perm = rng.permutation(L)
    np.testing.assert_allclose(layer(x[:, perm], mask=mask[:, perm]).numpy(), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("fill", [0.0, 1e6, np.nan, np.inf])
def test_padded_tokens_change_nothing(rng, data, hard, fill):
    x, mask = data
    layer = make(rng, hard=hard)
    reference = np.stack([layer(x[i : i + 1, : mask[i].sum()]).numpy()[0] for i in range(B)])
    padded = np.where(mask[..., None] > 0, x, fill).astype("float32")
    out = layer(padded, mask=mask.astype(bool)).numpy()
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_all_padded_gives_finite_zeros(rng, data, normalize):
    x, _ = data
    layer = make(rng, normalize=normalize)
    mask = np.zeros((B, L), "float32")
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x, mask=mask)
        loss = tf.reduce_sum(out)
    np.testing.assert_array_equal(out.numpy(), np.zeros((B, N, W)))
    for grad in tape.gradient(loss, [x] + layer.trainable_weights):
        assert grad is not None and np.all(np.isfinite(grad.numpy()))


def test_keras_mask_propagates_from_embedding(rng):
    ids = np.array([[3, 1, 4, 0, 0], [5, 9, 2, 6, 5]])
    inputs = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(10, D, mask_zero=True)(inputs)
    sketch_layer = TEMDESketch(N, K)
    model = keras.Model(inputs, sketch_layer(embedded))
    embeddings = model.layers[1](ids).numpy()
    np.testing.assert_allclose(model(ids).numpy(), sketch_layer(embeddings, mask=ids != 0).numpy(), rtol=1e-6)


# ---------------------------------------------------------------- adapt (EMDE's data-dependent fit)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_adapt_sets_standardisation_and_medians(rng, layer_norm):
    samples = rng.normal(loc=3.0, scale=2.0, size=(2, 50, D)).astype("float32")
    mask = rng.uniform(size=(2, 50)) < 0.7
    samples_padded = np.where(mask[..., None], samples, 1e4).astype("float32")
    layer = TEMDESketch(N, K, layer_norm=layer_norm).adapt(samples_padded, mask=mask)
    valid = samples[mask].astype("float64")
    seen = valid
    if layer_norm:  # the statistics are those of the token-normalised samples
        centred = valid - valid.mean(-1, keepdims=True)
        seen = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layer.mean.numpy(), seen.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.std.numpy(), seen.std(0), rtol=1e-5)
    z = np_projections(valid, layer).reshape(len(valid), N * K)
    above = (z > 0).sum(0)
    below = (z < 0).sum(0)
    assert np.all(np.abs(above - below) <= 1), (above, below)  # each hyperplane splits the samples 50/50


def test_adapt_without_standardize_and_flat_samples(rng):
    samples = rng.normal(loc=1.0, size=(41, D)).astype("float32")
    layer = TEMDESketch(N, K, standardize=False).adapt(samples)
    assert not any("mean" in w.name or "std" in w.name for w in layer.weights)
    proj = samples.astype("float64") @ layer.hyperplanes.numpy()
    np.testing.assert_allclose(layer.biases.numpy(), np.median(proj, axis=0), rtol=1e-5, atol=1e-5)


def test_adapted_hard_layer_is_emde(rng):
    """Frozen hard layer after adapt == EMDE's coder written out in NumPy (StandardScaler, RP, median, bits)."""
    items = rng.normal(size=(30, D)).astype("float32") * rng.uniform(0.5, 3, size=D).astype("float32")
    layer = TEMDESketch(N, K, hard=True, normalize=False).adapt(items)
    scaled = (items - items.mean(0)) / items.std(0)
    proj = scaled @ layer.hyperplanes.numpy()
    bits = (proj > np.median(proj, axis=0)).reshape(30, N, K)
    codes = (bits * 2 ** np.arange(K)).sum(-1)  # [items, N]
    session = np.array([[0, 3, 7, 7, 12]])  # a set with a repeated item
    expected = np.zeros((1, N, W))
    for item in session[0]:
        expected[0, np.arange(N), codes[item]] += 1
    np.testing.assert_allclose(layer(items[session]).numpy(), expected)


# ---------------------------------------------------------------- training, serialization, mixed precision


def test_gradients_reach_every_trainable_weight(rng, data):
    x, mask = data
    layer = make(rng, temperature=2.0)
    target = rng.uniform(size=(B, N, W)).astype("float32")
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, mask=mask) * target)
    assert {w.name for w in layer.trainable_weights} == {"hyperplanes", "biases"}
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    for grad in grads:
        assert grad is not None and np.all(np.isfinite(grad.numpy())) and np.abs(grad.numpy()).max() > 0
    assert np.all(grads[0].numpy()[mask == 0] == 0)  # nothing flows into padded tokens


def test_save_load_identical(rng, data, tmp_path):
    x, mask = data
    tokens = keras.Input((None, D), name="tokens")
    token_mask = keras.Input((None,), dtype="bool", name="token_mask")
    layer = TEMDESketch(N, K, temperature=0.5, layer_norm=True, name="sketch")
    model = keras.Model([tokens, token_mask], layer(tokens, mask=token_mask))
    randomize(layer, rng)
    layer.temperature_weight.assign(0.3)
    loaded = keras_round_trip(model, [x, mask.astype(bool)], tmp_path / "sketch.keras")
    config = loaded.get_layer("sketch").get_config()
    assert {k: config[k] for k in ("depth", "bits", "temperature", "normalize", "hard", "standardize",
                                   "layer_norm")} == {
        "depth": N, "bits": K, "temperature": 0.5, "normalize": True, "hard": False, "standardize": True,
        "layer_norm": True,
    }


def test_mixed_precision_outputs_float32(rng, data):
    x, mask = data
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("mixed_float16")
        layer = make(rng)
        assert layer.compute_dtype == "float16"
        out = layer(x, mask=mask)
        assert out.dtype == "float32" and np.all(np.isfinite(out.numpy()))
        x16 = x.astype("float16").astype("float64")  # the layer sees float16 inputs under this policy
        np.testing.assert_allclose(out.numpy(), np_sketch(x16, layer, mask), rtol=1e-3, atol=1e-4)
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.config.dtype_policy().name == "float32"


# ---------------------------------------------------------------- errors


def test_errors_name_the_argument(rng, data):
    x, mask = data
    layer = make(rng)
    with pytest.raises(ValueError, match=r"inputs must have shape \[batch, length, dim\].*got shape \(3, 8\)"):
        layer(x[:, 0])
    with pytest.raises(ValueError, match=r"inputs must have shape \[batch, length, 8\].*got shape \(3, 6, 5\)"):
        layer(x[..., :5])
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, length\].*got shape \(3, 5\)"):
        layer(x, mask=mask[:, :5])
    with pytest.raises(ValueError, match=r"mask must have shape .*rank 2.*got shape \(3,\)"):
        layer(x, mask=mask[:, 0])
    with pytest.raises(ValueError, match=r"token_weights must have shape"):
        layer(x, token_weights=np.ones((3, 2), "float32"))
    with pytest.raises(ValueError, match=r"bits must be an integer"):
        TEMDESketch(4, 0)
    with pytest.raises(ValueError, match=r"depth must be a positive integer"):
        TEMDESketch(0, 3)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        TEMDESketch(4, 3, temperature=0.0)
    with pytest.raises(ValueError, match=r"samples must have shape \[num_samples, dim\]"):
        layer.adapt(np.ones((2, 3, 4, D)))
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, length\] = \(3, 6\).*got shape \(3, 5\)"):
        layer.adapt(x, mask=mask[:, :5])
    with pytest.raises(ValueError, match=r"samples must have last dimension 8.*got shape \(4, 5\)"):
        layer.adapt(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"at least one valid vector"):
        layer.adapt(x, mask=np.zeros((B, L)))


# ---------------------------------------------------------------- sketch_similarity


def np_sketch_similarity(a, b, eps=1e-6):
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), eps)
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = np.mean([a[i, n] @ b[j, n] for n in range(a.shape[1])])
    return out


def test_sketch_similarity_matches_numpy(rng):
    a = rng.uniform(0, 3, size=(3, N, W)).astype("float32")  # unnormalised histograms
    b = rng.uniform(0, 3, size=(5, N, W)).astype("float32")
    b[1, 2] = 0.0  # an empty row contributes 0
    out = sketch_similarity(a, b).numpy()
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out, np_sketch_similarity(a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diag(sketch_similarity(a, a).numpy()), np.ones(3), rtol=1e-5)
    assert np.all(sketch_similarity(np.zeros((2, N, W)), b).numpy() == 0)


def test_sketch_similarity_of_layer_outputs(rng, data):
    x, mask = data
    layer = make(rng, normalize=False)
    out = layer(x, mask=mask).numpy()
    np.testing.assert_allclose(
        sketch_similarity(out, out).numpy(), np_sketch_similarity(out, out), rtol=1e-5, atol=1e-6
    )


def test_sketch_similarity_errors():
    with pytest.raises(ValueError, match=r"a must have shape \[batch_a, depth, width\].*got shape \(2, 8\)"):
        sketch_similarity(np.ones((2, 8)), np.ones((2, 1, 8)))
    with pytest.raises(ValueError, match=r"same width.*\(2, 4, 8\) and \(2, 4, 4\)"):
        sketch_similarity(np.ones((2, 4, 8)), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match=r"same depth"):
        sketch_similarity(np.ones((2, 4, 8)), np.ones((2, 3, 8)))
