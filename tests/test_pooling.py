"""Masked max/mean pooling and GPO (VSE-infinity §1.1), against NumPy re-derivations."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfemde.layers.pooling import GPO, MaskedMaxPooling, MaskedMeanPooling
from tfemde.layers.positional import rank_positional_encoding
from helpers import keras_round_trip

B, L, D, DPE, U = 4, 6, 5, 8, 4
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype="float32")


def npy(t):
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


MAKERS = [lambda rng: make_gpo(rng), lambda rng: MaskedMaxPooling(), lambda rng: MaskedMeanPooling()]


def garbage_padding(rng, x, mask):
    """The same set with random huge values, NaN and inf at padded positions."""
    y = x.copy()
    pad = mask == 0
    y[pad] = rng.normal(0, 1e4, size=y[pad].shape)
    rows, cols = np.nonzero(pad)
    y[rows[0], cols[0], 0], y[rows[-1], cols[-1], -1] = np.nan, np.inf
    return y


# ---------------------------------------------------------------- NumPy GPO
def np_rank_pe(n, d):
    """VSE-infinity positional_encoding_1d: positions 0..n-1, sin in even and cos in odd channels."""
    pe = np.zeros((n, d))
    div = np.exp(np.arange(0, d, 2) * -(math.log(10000.0) / d))
    pe[:, 0::2] = np.sin(np.arange(n)[:, None] * div)
    pe[:, 1::2] = np.cos(np.arange(n)[:, None] * div)
    return pe


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_gru_step(x, h, cell):
    """reset_after=True GRU (the PyTorch formula): gates z, r, h; bias rows = input, recurrent."""
    kernel, recurrent, bias = (w.numpy().astype("float64") for w in (cell.kernel, cell.recurrent_kernel, cell.bias))
    u = h.shape[-1]
    xi, hr = x @ kernel + bias[0], h @ recurrent + bias[1]
    z = sigmoid(xi[:u] + hr[:u])
    r = sigmoid(xi[u : 2 * u] + hr[u : 2 * u])
    return z * h + (1 - z) * np.tanh(xi[2 * u :] + r * hr[2 * u :])


def np_bigru_ave(seq, forward_cell, backward_cell, units):
    """A packed (length-aware) bidirectional GRU over `seq` [n, F], directions averaged."""
    n = len(seq)
    fwd, bwd = np.zeros((n, units)), np.zeros((n, units))
    h = np.zeros(units)
    for t in range(n):
        h = np_gru_step(seq[t], h, forward_cell)
        fwd[t] = h
    h = np.zeros(units)
    for t in reversed(range(n)):
        h = np_gru_step(seq[t], h, backward_cell)
        bwd[t] = h
    return (fwd + bwd) / 2


def np_gpo(layer, x, mask):
    out, weights = np.zeros((x.shape[0], x.shape[2])), np.zeros(x.shape[:2])
    for b in range(x.shape[0]):
        feats = x[b][mask[b] > 0].astype("float64")
        n = len(feats)
        if n == 0:
            continue
        ranked = -np.sort(-feats, axis=0)  # descending per dimension
        h = np_bigru_ave(np_rank_pe(n, layer.d_pe), layer.gru.forward_layer.cell, layer.gru.backward_layer.cell, U)
        scores = h @ layer.score.kernel.numpy()[:, 0] - layer.rank_prior * np.arange(n)
        theta = np.exp((scores - scores.max()) / layer.temperature)
        theta /= theta.sum()
        out[b] = theta @ ranked
        weights[b, :n] = theta
    return out, weights


def make_gpo(rng, scale=0.7, **kwargs):
    gpo = GPO(**{"d_pe": DPE, "gru_units": U, **kwargs})
    gpo(np.zeros((1, L, D), "float32"))
    for w in gpo.trainable_weights:
        w.assign(rng.normal(0.0, scale, size=w.shape).astype("float32"))
    return gpo


# ---------------------------------------------------------------- max / mean
def test_masked_max_and_mean_match_numpy(rng):
    x = rng.normal(size=(B, L, D)).astype("float32")
    got_max = npy(MaskedMaxPooling()(garbage_padding(rng, x, MASK), mask=MASK))
    got_mean = npy(MaskedMeanPooling()(garbage_padding(rng, x, MASK), mask=MASK > 0))
    for b in range(B):
        valid = x[b][MASK[b] > 0]
        want_max = valid.max(0) if len(valid) else np.zeros(D)
        want_mean = valid.mean(0) if len(valid) else np.zeros(D)
        np.testing.assert_allclose(got_max[b], want_max, atol=1e-6)
        np.testing.assert_allclose(got_mean[b], want_mean, atol=1e-6)
    np.testing.assert_allclose(npy(MaskedMaxPooling()(x)), x.max(1), atol=1e-6)
    np.testing.assert_allclose(npy(MaskedMeanPooling()(x)), x.mean(1), atol=1e-6)


def test_masked_pooling_negative_values_and_int_mask():
    x = -np.arange(1, 13, dtype="float32").reshape(1, 4, 3) * 1e3
    got = npy(MaskedMaxPooling()(x, mask=np.array([[0, 0, 1, 1]], "int64")))
    np.testing.assert_allclose(got, x[0, 2:].max(0)[None])


# ---------------------------------------------------------------- GPO
def test_rank_positional_encoding_matches_numpy():
    np.testing.assert_allclose(npy(rank_positional_encoding(7, 32)), np_rank_pe(7, 32), atol=1e-6)


def test_keras_bidirectional_gru_is_length_aware(rng):
    gpo = make_gpo(rng)
    lengths = np.array([6, 3, 1, 0])
    rank_mask = np.arange(L)[None] < lengths[:, None]
    seq = rng.normal(size=(B, L, DPE)).astype("float32")
    got = npy(gpo.gru(seq, mask=rank_mask))
    for b, n in enumerate(lengths):
        want = np_bigru_ave(seq[b, :n].astype("float64"), gpo.gru.forward_layer.cell, gpo.gru.backward_layer.cell, U)
        np.testing.assert_allclose(got[b, :n], want, atol=1e-5)
        # The backward direction must start at the last valid step: a trimmed sequence gives the same.
        if n:
            np.testing.assert_allclose(npy(gpo.gru(seq[b : b + 1, :n]))[0], got[b, :n], atol=1e-6)
        np.testing.assert_array_equal(got[b, n:], 0.0)


@pytest.mark.parametrize("rank_prior", [0.0, 0.3])
def test_gpo_matches_numpy_with_variable_lengths(rng, rank_prior):
    gpo = make_gpo(rng, rank_prior=rank_prior)
    x = rng.normal(size=(B, L, D)).astype("float32")
    pooled, weights = gpo(x, mask=MASK, return_weights=True)
    want, want_w = np_gpo(gpo, x, MASK)
    np.testing.assert_allclose(npy(pooled), want, atol=1e-5)
    np.testing.assert_allclose(npy(weights), want_w, atol=1e-5)
    np.testing.assert_array_equal(npy(pooled)[3], np.zeros(D))


def test_gpo_padding_and_order_change_nothing(rng):
    gpo = make_gpo(rng)
    x = rng.normal(size=(B, L, D)).astype("float32")
    base = npy(gpo(x, mask=MASK))
    np.testing.assert_allclose(npy(gpo(garbage_padding(rng, x, MASK), mask=MASK)), base, atol=1e-6)
    perm = np.array([5, 2, 0, 4, 1, 3])
    np.testing.assert_allclose(npy(gpo(x[:, perm], mask=MASK[:, perm])), base, atol=1e-6)
    trimmed = npy(gpo(x[2:3, [1, 3, 4]]))
    np.testing.assert_allclose(trimmed[0], base[2], atol=1e-6)
    assert np.all(np.isfinite(npy(gpo(x, mask=np.zeros((B, L))))))


def test_gpo_reduces_to_mean_and_max_pooling(rng):
    x = rng.normal(size=(B, L, D)).astype("float32")
    gpo = make_gpo(rng)
    # Zero scores: uniform weights over the valid ranks, i.e. mean pooling.
    gpo.score.kernel.assign(np.zeros((U, 1), "float32"))
    np.testing.assert_allclose(npy(gpo(x, mask=MASK)), npy(MaskedMeanPooling()(x, mask=MASK)), atol=1e-5)
    # A generator whose output is tanh(cos(rank)) (update gate shut, input channel 1 = cos(k)):
    # rank 0 wins by a wide margin at temperature 0.1, i.e. max pooling.
    for cell in (gpo.gru.forward_layer.cell, gpo.gru.backward_layer.cell):
        kernel = np.zeros((DPE, 3 * U), "float32")
        kernel[1, 2 * U :] = 1.0
        bias = np.zeros((2, 3 * U), "float32")
        bias[0, :U] = -30.0
        cell.kernel.assign(kernel)
        cell.recurrent_kernel.assign(np.zeros((U, 3 * U), "float32"))
        cell.bias.assign(bias)
    gpo.score.kernel.assign(np.full((U, 1), 25.0, "float32"))
    pooled, weights = gpo(x, mask=MASK, return_weights=True)
    assert npy(weights)[:3, 0].min() > 0.999
    np.testing.assert_allclose(npy(pooled), npy(MaskedMaxPooling()(x, mask=MASK)), atol=1e-3)


def test_gpo_gradients_finite_and_reach_every_weight(rng):
    gpo = make_gpo(rng)
    x = tf.constant(rng.normal(size=(B, L, D)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(gpo(x, mask=MASK) * rng.normal(size=(B, D)).astype("float32"))
    grads = tape.gradient(loss, gpo.trainable_weights + [x])
    for g in grads:
        assert g is not None and np.all(np.isfinite(npy(g))) and np.abs(npy(g)).max() > 0
    assert np.all(npy(grads[-1])[MASK == 0] == 0)


@pytest.mark.parametrize("make", MAKERS, ids=["gpo", "max", "mean"])
def test_keras_save_load_identical(rng, tmp_path, make):
    layer = make(rng)
    inp = keras.Input((None, D), name="inputs")
    mask_in = keras.Input((None,), name="mask", dtype="bool")
    model = keras.Model([inp, mask_in], layer(inp, mask=mask_in))
    x = rng.normal(size=(B, L, D)).astype("float32")
    loaded = keras_round_trip(model, [x, MASK > 0], tmp_path / "pool.keras")
    assert loaded.layers[-1].get_config() == layer.get_config()


def test_gpo_symbolic_return_weights(rng):
    gpo = make_gpo(rng)
    inp = keras.Input((None, D))
    pooled, weights = gpo(inp, mask=keras.Input((None,)), return_weights=True)
    assert tuple(pooled.shape) == (None, D) and tuple(weights.shape) == (None, None)


@pytest.mark.parametrize("make", MAKERS, ids=["gpo", "max", "mean"])
def test_mixed_float16_close_to_float32(rng, make):
    layer = make(rng)
    x = rng.normal(size=(B, L, D)).astype("float32")
    want = npy(layer(x, mask=MASK))
    half = type(layer).from_config({**layer.get_config(), "dtype": "mixed_float16"})
    half(x, mask=MASK)
    half.set_weights(layer.get_weights())
    got = half(x, mask=MASK)
    assert keras.backend.standardize_dtype(got.dtype) == "float16"
    np.testing.assert_allclose(npy(got).astype("float32"), want, atol=1e-2)


@pytest.mark.parametrize("cls", [GPO, MaskedMaxPooling, MaskedMeanPooling])
def test_bad_shapes_raise_naming_the_argument(cls):
    layer = cls()
    with pytest.raises(ValueError, match=r"inputs must have shape \[batch, length, dim\].*\(4, 6\)"):
        layer(np.zeros((4, 6), "float32"))
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, length\].*\(4, 5\)"):
        layer(np.zeros((4, 6, 3), "float32"), mask=np.ones((4, 5)))


def test_gpo_rank_prior_starts_near_max_pooling(rng):
    """With zero generator scores, the prior alone weights rank r by softmax(-prior * r / temperature): a large
    prior is max pooling, and the prior shifts the weights towards the top ranks for any generator."""
    x = rng.normal(size=(B, L, D)).astype("float32")
    gpo = make_gpo(rng, rank_prior=5.0)
    gpo.score.kernel.assign(np.zeros((U, 1), "float32"))
    np.testing.assert_allclose(npy(gpo(x, mask=MASK)), npy(MaskedMaxPooling()(x, mask=MASK)), atol=1e-5)
    weights = {prior: npy(make_gpo(np.random.default_rng(3), rank_prior=prior)(x, return_weights=True)[1])
               for prior in (0.0, 0.1)}
    assert np.all(weights[0.1][:, 0] > weights[0.0][:, 0]) and np.all(weights[0.1][:, -1] < weights[0.0][:, -1])
    with pytest.raises(ValueError, match="rank_prior"):
        GPO(rank_prior=-1.0)
