"""SetPrediction (DivE §3.2), gelu_erf and the sine positional encoding, against NumPy re-derivations."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfemde.layers.activations import gelu_erf
from tfemde.layers.positional import sine_positional_encoding
from tfemde.layers.set_prediction import SetPrediction
from helpers import keras_round_trip

B, L, DIN, D, K, T, H = 3, 5, 6, 8, 3, 2, 2
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype="float32")

_erf = np.vectorize(math.erf)


# ---------------------------------------------------------------- NumPy re-derivation of §3.2
def npy(t):
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def np_layer_norm(x, gamma, beta, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_sine_pe(valid, dim):
    """DivE's PositionEmbeddingSine1D(normalize=True), positions counted over the valid inputs."""
    n = int(valid.sum())
    pe = np.zeros((len(valid), dim))
    pos = 0
    for j in range(len(valid)):
        if valid[j]:
            pos += 1
            p = pos / (n + 1e-6) * 2 * math.pi
            for i in range(dim):
                dim_t = 10000.0 ** (2 * (i // 2) / dim)
                pe[j, i] = math.sin(p / dim_t) if i % 2 == 0 else math.cos(p / dim_t)
    return pe


def np_l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def block_params(block):
    g = lambda w: w.numpy().astype("float64")  # noqa: E731
    return dict(
        qg=g(block.query_norm.gamma), qb=g(block.query_norm.beta),
        cg=g(block.context_norm.gamma), cb=g(block.context_norm.beta),
        fg=g(block.ff_norm.gamma), fb=g(block.ff_norm.beta),
        wq=g(block.query_proj.kernel).reshape(block.dim, -1),
        wk=g(block.key_proj.kernel).reshape(-1, block.num_heads * block.head_dim),
        wv=g(block.value_proj.kernel).reshape(-1, block.num_heads * block.head_dim),
        wo=g(block.output_proj.kernel).reshape(block.num_heads * block.head_dim, block.dim),
        bo=g(block.output_proj.bias),
        w1=g(block.ff_hidden.kernel), b1=g(block.ff_hidden.bias),
        w2=g(block.ff_output.kernel), b2=g(block.ff_output.bias),
    )


def np_set_prediction(layer, local, glob, mask, reference=False):
    """Per-sample forward pass of DivE's module. Fixed masking uses only the valid rows."""
    heads, e, eps = layer.num_heads, layer.effective_head_dim, layer.epsilon
    params = [block_params(b) for b in layer.blocks]
    q0 = npy(layer.slot_queries).astype("float64")
    outs, residuals = [], []
    for b in range(local.shape[0]):
        valid = mask[b] > 0
        pe = np_sine_pe(valid, local.shape[-1]) if layer.positional_encoding else np.zeros(local.shape[1:])
        if reference:
            context, key_pe, padded = local[b].astype("float64"), pe, ~valid
        else:
            context, key_pe, padded = local[b][valid].astype("float64"), pe[valid], np.zeros(valid.sum(), bool)
        x = q0.copy()
        for t in range(layer.depth):
            p = params[0 if layer.share_weights else t]
            c_hat = np_layer_norm(context, p["cg"], p["cb"], 1e-5)
            q = np_layer_norm(x, p["qg"], p["qb"], 1e-5) @ p["wq"]
            k = (c_hat + key_pe) @ p["wk"]
            v = c_hat @ p["wv"]
            per_head = []
            for h in range(heads):
                sl = slice(h * e, (h + 1) * e)
                logits = q[:, sl] @ k[:, sl].T / math.sqrt(e)  # [K, n]
                logits[:, padded] = -1e30  # reference only: equal logits in every slot
                a = np.exp(logits - logits.max(0, keepdims=True))
                a = a / a.sum(0, keepdims=True)  # softmax over slots
                a = a / (a.sum(1, keepdims=True) + eps)  # weighted mean over inputs
                per_head.append(a @ v[:, sl])
            x = x + np.concatenate(per_head, -1) @ p["wo"] + p["bo"]
            x = x + np_gelu(np_layer_norm(x, p["fg"], p["fb"], 1e-5) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        r = np_layer_norm(x, npy(layer.final_norm.gamma), npy(layer.final_norm.beta), 1e-5)
        s = r
        if layer.global_residual:
            gn = layer.global_norm
            s = np_layer_norm(glob[b].astype("float64"), npy(gn.gamma), npy(gn.beta), 1e-5) + r
        outs.append(np_l2n(s))
        residuals.append(np_l2n(r))
    return np.stack(outs), np.stack(residuals)


# ---------------------------------------------------------------- helpers
def make_inputs(rng, b=B, l=L, din=DIN):
    return rng.normal(size=(b, l, din)).astype("float32"), rng.normal(size=(b, D)).astype("float32")


def make_layer(rng, **kwargs):
    kwargs = {"num_slots": K, "dim": D, "depth": T, "num_heads": H, **kwargs}
    layer = SetPrediction(**kwargs)
    local, glob = make_inputs(rng)
    layer(local, glob, mask=MASK)
    for w in layer.trainable_weights:
        w.assign(rng.normal(0.0, 0.5, size=w.shape).astype("float32"))
    return layer


def run(layer, local, glob, mask=MASK, **kwargs):
    out = layer(local, glob, mask=mask, **kwargs)
    if isinstance(out, tuple):
        return tuple(npy(o) for o in out)
    return npy(out)


# ---------------------------------------------------------------- activation and encoding
def test_gelu_erf_matches_numpy_and_is_registered():
    x = np.linspace(-6, 6, 41).astype("float32")
    np.testing.assert_allclose(npy(gelu_erf(x)), np_gelu(x.astype("float64")), atol=1e-6)
    assert keras.saving.get_registered_object("tfemde>gelu_erf") is gelu_erf
    dense = keras.layers.Dense(3, activation=gelu_erf)
    clone = keras.layers.deserialize(keras.layers.serialize(dense))
    assert clone.activation is gelu_erf


def test_sine_positional_encoding_true_length_and_zero_padding():
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1]], dtype=bool)
    got = npy(sine_positional_encoding(mask, dim=10))
    want = np.stack([np_sine_pe(row, 10) for row in mask])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Lengths give the same as the equivalent right-padded mask; a sample's encoding ignores the batch.
    by_len = npy(sine_positional_encoding(np.array([3, 6]), length=6, dim=10))
    np.testing.assert_allclose(by_len, want[:2], atol=1e-6)
    alone = npy(sine_positional_encoding(np.array([3]), length=3, dim=10))
    np.testing.assert_allclose(alone[0], want[0, :3], atol=1e-6)
    raw = npy(sine_positional_encoding(np.array([2]), length=3, dim=4, normalize=False))
    np.testing.assert_allclose(raw[0, 1], [math.sin(2), math.cos(2), math.sin(2 / 100), math.cos(2 / 100)], atol=1e-6)
    with pytest.raises(ValueError, match="length"):
        sine_positional_encoding(np.array([3]), dim=4)
    with pytest.raises(ValueError, match="lengths_or_mask"):
        sine_positional_encoding(np.ones((2, 3, 4)), dim=4)


# ---------------------------------------------------------------- forward pass
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"share_weights": False, "positional_encoding": True},
        {"global_residual": False, "head_dim": 3, "num_heads": 3, "ff_mult": 2},
    ],
)
def test_matches_numpy_forward(rng, kwargs):
    layer = make_layer(rng, **kwargs)
    local, glob = make_inputs(rng)
    out, res = run(layer, local, glob, return_residual=True, training=False)
    want_out, want_res = np_set_prediction(layer, local, glob, MASK)
    assert out.shape == (B, K, D) and res.shape == (B, K, D)
    np.testing.assert_allclose(out, want_out, atol=2e-5)
    np.testing.assert_allclose(res, want_res, atol=2e-5)


def test_default_head_dim_is_the_reference_4x512():
    assert SetPrediction().effective_head_dim == 512
    layer = make_layer(np.random.default_rng(1))
    assert tuple(layer.blocks[0].query_proj.kernel.shape) == (D, H, 2 * D // H)


def test_padded_inputs_change_nothing(rng):
    layer = make_layer(rng, positional_encoding=True)
    local, glob = make_inputs(rng)
    garbage = local.copy()
    pad = MASK == 0
    garbage[pad] = rng.normal(0, 1e3, size=garbage[pad].shape)
    garbage[1, 4, 0], garbage[1, 2, 1] = np.nan, np.inf
    zeros = np.where(pad[..., None], 0.0, local).astype("float32")
    base = run(layer, zeros, glob)
    np.testing.assert_allclose(run(layer, garbage, glob), base, atol=1e-6)
    # Same as the set without its padding at all (row 0 has no padding; row 1 keeps its valid rows).
    short = run(layer, local[1:2, [0, 1, 3]], glob[1:2], mask=None)
    np.testing.assert_allclose(short[0], base[1], atol=1e-5)


def test_reference_masking_reproduces_the_leak(rng):
    layer = make_layer(rng, reference_masking=True)
    local, glob = make_inputs(rng)
    out = run(layer, local, glob)
    want, _ = np_set_prediction(layer, local, glob, MASK, reference=True)
    np.testing.assert_allclose(out, want, atol=2e-5)
    changed = local.copy()
    changed[1, 4] = rng.normal(size=DIN)  # a new padded value (a mere shift would vanish in the LayerNorm)
    assert np.abs(run(layer, changed, glob)[1] - out[1]).max() > 1e-3
    # And the fixed layer with the same weights ignores the same change.
    fixed = SetPrediction.from_config({**layer.get_config(), "reference_masking": False})
    fixed(local, glob, mask=MASK)
    fixed.set_weights(layer.get_weights())
    np.testing.assert_allclose(run(fixed, changed, glob)[1], run(fixed, local, glob)[1], atol=1e-6)


def test_permutation_of_valid_inputs_changes_nothing(rng):
    layer = make_layer(rng)
    local, glob = make_inputs(rng)
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(run(layer, local[:, perm], glob, mask=MASK[:, perm]), run(layer, local, glob), atol=1e-5)


def test_unit_vectors_and_all_padded_row_finite(rng):
    layer = make_layer(rng)
    local, glob = make_inputs(rng)
    out, res = run(layer, local, glob, return_residual=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(res))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(res, axis=-1), 1.0, atol=1e-5)
    empty = run(layer, local, glob, mask=np.zeros((B, L), bool))
    assert np.all(np.isfinite(empty))


def test_deterministic_at_inference_random_in_training(rng):
    layer = make_layer(rng, dropout=0.5)
    local, glob = make_inputs(rng)
    np.testing.assert_array_equal(run(layer, local, glob), run(layer, local, glob, training=False))
    assert np.abs(run(layer, local, glob, training=True) - run(layer, local, glob, training=True)).max() > 1e-4


def test_unshared_blocks_have_depth_times_the_weights(rng):
    shared = make_layer(rng, depth=3)
    unshared = make_layer(rng, depth=3, share_weights=False)
    per_block = len(shared.blocks[0].trainable_weights)
    assert len(shared.blocks) == 1 and len(unshared.blocks) == 3
    assert len(unshared.trainable_weights) - len(shared.trainable_weights) == 2 * per_block
    assert sum(int(np.prod(w.shape)) for b in unshared.blocks for w in b.trainable_weights) == 3 * sum(
        int(np.prod(w.shape)) for w in shared.blocks[0].trainable_weights
    )


@pytest.mark.parametrize("share_weights", [True, False])
def test_gradients_finite_and_reach_every_weight(rng, share_weights):
    layer = make_layer(rng, share_weights=share_weights, positional_encoding=True)
    local, glob = make_inputs(rng)
    target = rng.normal(size=(B, K, D)).astype("float32")
    with tf.GradientTape() as tape:
        out, res = layer(local, glob, mask=MASK, training=True, return_residual=True)
        loss = tf.reduce_sum(out * target) + tf.reduce_sum(res * target)
    grads = tape.gradient(loss, layer.trainable_weights)
    for w, g in zip(layer.trainable_weights, grads):
        assert g is not None, w.path
        assert np.all(np.isfinite(npy(g))), w.path
        assert np.abs(npy(g)).max() > 0, w.path


def test_keras_save_load_identical(rng, tmp_path):
    layer = make_layer(rng, positional_encoding=True, share_weights=False)
    local_in = keras.Input((None, DIN), name="local")
    glob_in = keras.Input((D,), name="global")
    mask_in = keras.Input((None,), name="mask", dtype="bool")
    out, res = layer(local_in, glob_in, mask=mask_in, return_residual=True)
    assert tuple(out.shape) == (None, K, D) and tuple(res.shape) == (None, K, D)
    model = keras.Model([local_in, glob_in, mask_in], {"set": out, "residual": res})
    local, glob = make_inputs(rng)
    np.testing.assert_array_equal(npy(model([local, glob, MASK > 0])["set"]), run(layer, local, glob))
    loaded = keras_round_trip(model, [local, glob, MASK > 0], tmp_path / "spm.keras")
    assert loaded.layers[-1].get_config() == layer.get_config()


def test_bad_shapes_raise_naming_the_argument(rng):
    layer = make_layer(rng)
    local, glob = make_inputs(rng)
    with pytest.raises(ValueError, match=r"local_features must have shape \[batch, length, in_dim\].*\(3, 6\)"):
        layer(local[:, 0], glob)
    with pytest.raises(ValueError, match=r"global_features must have shape \[batch, dim=8\].*\(3, 5\)"):
        layer(local, glob[:, :5])
    with pytest.raises(ValueError, match=r"global_features must have shape \[batch, dim\]"):
        layer(local, glob[:, None])
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, length\].*\(3, 4\)"):
        layer(local, glob, mask=MASK[:, :4])
    with pytest.raises(ValueError, match="global_features must be given"):
        SetPrediction(num_slots=2, dim=D, depth=1, num_heads=2)(local, None)
    with pytest.raises(ValueError, match="num_slots"):
        SetPrediction(num_slots=0)


@pytest.mark.parametrize("reference_masking", [False, True])
def test_mixed_float16_close_to_float32(rng, reference_masking):
    layer = make_layer(rng, positional_encoding=True, reference_masking=reference_masking)
    half = SetPrediction.from_config({**layer.get_config(), "dtype": "mixed_float16"})
    local, glob = make_inputs(rng)
    half(local, glob, mask=MASK)
    half.set_weights(layer.get_weights())
    got = half(local, glob, mask=MASK)
    assert keras.backend.standardize_dtype(got.dtype) == "float16"
    np.testing.assert_allclose(npy(got).astype("float32"), run(layer, local, glob), atol=2e-2)
