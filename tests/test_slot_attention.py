"""SlotAttention (Locatello et al., §2.1) with masks, against a NumPy re-derivation."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfemde.layers.slot_attention import SlotAttention
from helpers import keras_round_trip

B, N, DIN, K, S, HID, ITERS = 3, 5, 4, 3, 6, 7, 3
MASK = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], dtype="float32")


def np_layer_norm(x, gamma, beta, eps=1e-3):  # Keras default epsilon, as the TF reference
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_gru_cell(x, h, kernel, recurrent, bias):
    """Keras GRUCell with reset_after=True: gates in the order z, r, h; bias rows = input, recurrent."""
    u = h.shape[-1]
    xi = x @ kernel + bias[0]
    hr = h @ recurrent + bias[1]
    z = sigmoid(xi[..., :u] + hr[..., :u])
    r = sigmoid(xi[..., u : 2 * u] + hr[..., u : 2 * u])
    cand = np.tanh(xi[..., 2 * u :] + r * hr[..., 2 * u :])
    return z * h + (1.0 - z) * cand


def np_slot_attention(layer, inputs, mask, init_slots=None):
    w = lambda v: v.numpy().astype("float64")  # noqa: E731
    out = []
    for b in range(inputs.shape[0]):
        x = inputs[b][mask[b] > 0].astype("float64")  # only the valid inputs exist
        x = np_layer_norm(x, w(layer.input_norm.gamma), w(layer.input_norm.beta))
        k, v = x @ w(layer.project_k.kernel), x @ w(layer.project_v.kernel)
        slots = np.repeat(w(layer.slots_mu)[0], layer.num_slots, 0) if init_slots is None else init_slots[b]
        for _ in range(layer.iterations):
            prev = slots
            q = np_layer_norm(slots, w(layer.slot_norm.gamma), w(layer.slot_norm.beta)) @ w(layer.project_q.kernel)
            q = q / math.sqrt(layer.slot_size)
            logits = k @ q.T  # [n, K]
            attn = np.exp(logits - logits.max(1, keepdims=True))
            attn = attn / attn.sum(1, keepdims=True) + layer.epsilon  # softmax over slots, + eps
            attn = attn / attn.sum(0, keepdims=True) if len(x) else attn  # weighted mean over inputs
            updates = attn.T @ v if len(x) else np.zeros((layer.num_slots, layer.slot_size))
            slots = np_gru_cell(updates, prev, w(layer.gru.kernel), w(layer.gru.recurrent_kernel), w(layer.gru.bias))
            hidden = np.maximum(
                np_layer_norm(slots, w(layer.mlp_norm.gamma), w(layer.mlp_norm.beta)) @ w(layer.mlp_hidden.kernel)
                + w(layer.mlp_hidden.bias),
                0.0,
            )
            slots = slots + hidden @ w(layer.mlp_output.kernel) + w(layer.mlp_output.bias)
        out.append(slots)
    return np.stack(out)


def npy(t):
    return t.numpy()


def make_layer(rng, **kwargs):
    layer = SlotAttention(K, S, **{"iterations": ITERS, "mlp_hidden_size": HID, "seed": 3, **kwargs})
    layer(np.zeros((B, N, DIN), "float32"))
    for w in layer.trainable_weights:
        w.assign(rng.normal(0.0, 0.5, size=w.shape).astype("float32"))
    return layer


def test_matches_numpy_with_mu_slots(rng):
    layer = make_layer(rng)
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    got = npy(layer(x, mask=MASK))
    assert got.shape == (B, K, S)
    np.testing.assert_allclose(got, np_slot_attention(layer, x, MASK), atol=2e-5)
    # Without a mask the arithmetic is the reference's exactly.
    full = np.ones((B, N), "float32")
    np.testing.assert_allclose(npy(layer(x)), np_slot_attention(layer, x, full), atol=2e-5)


def test_padded_inputs_change_nothing(rng):
    layer = make_layer(rng)
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    garbage = x.copy()
    pad = MASK == 0
    garbage[pad] = rng.normal(0, 1e3, size=garbage[pad].shape)
    garbage[1, 0, 0], garbage[2, 3, 1] = np.nan, -np.inf
    base = npy(layer(x, mask=MASK))
    np.testing.assert_allclose(npy(layer(garbage, mask=MASK > 0)), base, atol=1e-6)
    short = npy(layer(x[1:2, [1, 2, 4]]))
    np.testing.assert_allclose(short[0], base[1], atol=1e-5)
    assert np.all(np.isfinite(base[2]))


def test_deterministic_at_inference_random_in_training(rng):
    layer = make_layer(rng)
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    a, b = (npy(layer(x, mask=MASK, training=False)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    c, d = (npy(layer(x, mask=MASK, training=True)) for _ in range(2))
    assert np.abs(c - d).max() > 1e-3 and np.abs(c - a).max() > 1e-3
    # Training samples mu + exp(log_sigma) * eps: with sigma ~ 0 it is the inference output.
    layer.slots_log_sigma.assign(np.full((1, 1, S), -30.0, "float32"))
    np.testing.assert_allclose(npy(layer(x, mask=MASK, training=True)), a, atol=1e-5)


def test_training_samples_mu_plus_sigma_times_normal(rng):
    layer = make_layer(rng, iterations=2, seed=11)
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    got = npy(layer(x, mask=MASK, training=True))
    # The layer's first draw is the first draw of a fresh generator with the same seed.
    eps = npy(keras.random.normal((B, K, S), seed=keras.random.SeedGenerator(11))).astype("float64")
    init = layer.slots_mu.numpy() + np.exp(layer.slots_log_sigma.numpy()) * eps
    np.testing.assert_allclose(got, np_slot_attention(layer, x, MASK, init_slots=init), atol=2e-5)


def test_gradients_reach_mu_log_sigma_and_every_weight(rng):
    layer = make_layer(rng)
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    target = rng.normal(size=(B, K, S)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, mask=MASK, training=True) * target)
    grads = tape.gradient(loss, layer.trainable_weights)
    for w, g in zip(layer.trainable_weights, grads):
        assert g is not None, w.path
        g = npy(g)
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, w.path
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, mask=MASK, training=False) * target)
    assert tape.gradient(loss, layer.slots_log_sigma) is None  # inference uses mu only


def test_keras_save_load_identical(rng, tmp_path):
    layer = make_layer(rng)
    inp = keras.Input((None, DIN), name="inputs")
    mask_in = keras.Input((None,), name="mask")
    model = keras.Model([inp, mask_in], layer(inp, mask=mask_in))
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    loaded = keras_round_trip(model, [x, MASK], tmp_path / "sa.keras")
    assert loaded.layers[-1].get_config() == layer.get_config()


def test_bad_shapes_raise_naming_the_argument(rng):
    layer = make_layer(rng)
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    with pytest.raises(ValueError, match=r"inputs must have shape \[batch, num_inputs, in_dim\].*\(3, 4\)"):
        layer(x[:, 0])
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, length\].*\(2, 5\)"):
        layer(x, mask=MASK[:2])
    with pytest.raises(ValueError, match="slot_size"):
        SlotAttention(3, 0)


def test_mixed_float16_close_to_float32(rng):
    layer = make_layer(rng)
    half = SlotAttention.from_config({**layer.get_config(), "dtype": "mixed_float16"})
    x = rng.normal(size=(B, N, DIN)).astype("float32")
    half(x, mask=MASK)
    half.set_weights(layer.get_weights())
    got = half(x, mask=MASK)
    assert keras.backend.standardize_dtype(got.dtype) == "float16"
    want = npy(layer(x, mask=MASK))
    np.testing.assert_allclose(npy(got).astype("float32"), want, atol=5e-2 * max(1.0, np.abs(want).max()))
