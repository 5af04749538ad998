"""Set similarities (`tfemde.similarity`) and losses against independent NumPy re-derivations (ALGORITHMS.md §1.3, §3.3, §3.4)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfemde import losses
from tfemde.losses import diversity_loss, info_nce_loss, mmd_loss, triplet_loss
from tfemde.similarity import chamfer, max_similarity, smooth_chamfer


def unit(rng, *shape):
    v = rng.normal(size=shape)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype("float32")


@pytest.fixture
def sets(rng):
    x = unit(rng, 3, 4, 8)
    y = unit(rng, 5, 3, 8)
    x_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], "int32")
    y_mask = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]], "int32")
    return x, y, x_mask, y_mask


# ---------------------------------------------------------------- NumPy references (float64, plain loops)


def valid_elements(s, m):
    return s if m is None else s[np.asarray(m) != 0]


def np_set_similarity(x, y, x_mask, y_mask, pair_fn):
    out = np.zeros((len(x), len(y)))
    for a in range(len(x)):
        for b in range(len(y)):
            xa = valid_elements(x[a].astype("float64"), None if x_mask is None else x_mask[a])
            yb = valid_elements(y[b].astype("float64"), None if y_mask is None else y_mask[b])
            out[a, b] = pair_fn(xa @ yb.T) if len(xa) and len(yb) else 0.0
    return out


def np_smooth_chamfer(x, y, alpha, x_mask=None, y_mask=None):
    def pair(c):
        x_term = np.mean([np.log(np.sum(np.exp(alpha * row))) for row in c]) / alpha
        y_term = np.mean([np.log(np.sum(np.exp(alpha * col))) for col in c.T]) / alpha
        return 0.5 * (x_term + y_term)

    return np_set_similarity(x, y, x_mask, y_mask, pair)


def np_chamfer(x, y, x_mask=None, y_mask=None):
    return np_set_similarity(x, y, x_mask, y_mask, lambda c: 0.5 * (c.max(1).mean() + c.max(0).mean()))


def np_max(x, y, x_mask=None, y_mask=None):
    return np_set_similarity(x, y, x_mask, y_mask, lambda c: c.max())


# ---------------------------------------------------------------- set similarities


@pytest.mark.parametrize("alpha", [1.0, 16.0])
def test_smooth_chamfer_matches_numpy(sets, alpha):
    x, y, x_mask, y_mask = sets
    np.testing.assert_allclose(
        smooth_chamfer(x, y, alpha=alpha).numpy(), np_smooth_chamfer(x, y, alpha), rtol=1e-5, atol=1e-6
    )
    out = smooth_chamfer(x, y, alpha=alpha, a_mask=x_mask, b_mask=y_mask).numpy()
    assert out.shape == (3, 5) and out.dtype == "float32"
    np.testing.assert_allclose(out, np_smooth_chamfer(x, y, alpha, x_mask, y_mask), rtol=1e-5, atol=1e-6)


def test_chamfer_and_max_match_numpy(sets):
    x, y, x_mask, y_mask = sets
    for fn, ref in ((chamfer, np_chamfer), (max_similarity, np_max)):
        np.testing.assert_allclose(fn(x, y).numpy(), ref(x, y), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            fn(x, y, a_mask=x_mask, b_mask=y_mask).numpy(), ref(x, y, x_mask, y_mask), rtol=1e-6, atol=1e-6
        )


def test_smooth_chamfer_large_alpha_approaches_chamfer(sets):
    x, y, x_mask, y_mask = sets
    hard = np_chamfer(x, y, x_mask, y_mask)
    gaps = []
    for alpha in (4.0, 64.0, 4096.0):
        smooth = smooth_chamfer(x, y, alpha=alpha, a_mask=x_mask, b_mask=y_mask).numpy()
        assert np.all(smooth >= hard - 1e-6)
        assert np.all(smooth <= hard + np.log(4) / alpha + 1e-6)  # bias bounded by log|set| / alpha
        gaps.append(np.abs(smooth - hard).max())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_single_element_sets_reduce_to_cosine(rng):
    x, y = unit(rng, 4, 1, 8), unit(rng, 6, 1, 8)
    cos = x[:, 0].astype("float64") @ y[:, 0].T
    for fn in (smooth_chamfer, chamfer, max_similarity):
        np.testing.assert_allclose(fn(x, y).numpy(), cos, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fill", [1e6, np.nan, np.inf])
def test_masked_elements_change_nothing(sets, fill):
    x, y, x_mask, y_mask = sets
    x_pad = np.where(x_mask[..., None] > 0, x, fill).astype("float32")
    y_pad = np.where(y_mask[..., None] > 0, y, fill).astype("float32")
    for fn in (smooth_chamfer, chamfer, max_similarity):
        np.testing.assert_allclose(
            fn(x_pad, y_pad, a_mask=x_mask.astype(bool), b_mask=y_mask.astype(bool)).numpy(),
            fn(x, y, a_mask=x_mask, b_mask=y_mask).numpy(),
            rtol=1e-6,
        )


def test_empty_sets_are_finite_zero_with_finite_gradients(sets):
    x, y, x_mask, y_mask = sets
    x_mask = x_mask.copy()
    x_mask[1] = 0  # an empty image set; y_mask has no empty caption set, add one
    y_mask = y_mask.copy()
    y_mask[3] = 0
    x_t, y_t = tf.constant(x), tf.constant(y)
    for fn in (smooth_chamfer, chamfer, max_similarity):
        with tf.GradientTape() as tape:
            tape.watch([x_t, y_t])
            out = fn(x_t, y_t, a_mask=x_mask, b_mask=y_mask)
            total = tf.reduce_sum(out)
        out = out.numpy()
        assert np.all(np.isfinite(out)) and np.all(out[1] == 0) and np.all(out[:, 3] == 0)
        for grad in tape.gradient(total, [x_t, y_t]):
            assert np.all(np.isfinite(grad.numpy()))
    all_masked = smooth_chamfer(x, y, a_mask=np.zeros((3, 4)), b_mask=np.zeros((5, 3))).numpy()
    np.testing.assert_array_equal(all_masked, np.zeros((3, 5)))


def test_smooth_chamfer_mixed_float16_is_finite(sets):
    x, y, x_mask, y_mask = sets
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("mixed_float16")
        dense = keras.layers.Dense(8, kernel_initializer="identity")
        x16, y16 = dense(x), dense(y)
        assert x16.dtype == "float16"
        with tf.GradientTape() as tape:
            tape.watch([x16, y16])
            out = smooth_chamfer(x16, y16, alpha=16.0, a_mask=x_mask, b_mask=y_mask)
        grads = tape.gradient(out, [x16, y16])
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.config.dtype_policy().name == "float32"
    assert out.dtype == "float32" and np.all(np.isfinite(out.numpy()))
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    reference = np_smooth_chamfer(x.astype("float16"), y.astype("float16"), 16.0, x_mask, y_mask)
    np.testing.assert_allclose(out.numpy(), reference, atol=2e-3)


def test_similarity_errors(sets):
    x, y, x_mask, _ = sets
    with pytest.raises(ValueError, match=r"same element dim D.*\(3, 4, 8\) and \(5, 3, 6\)"):
        smooth_chamfer(x, y[..., :6])
    with pytest.raises(ValueError, match=r"a_sets must have shape \[batch, set_size, dim\].*got shape \(3, 8\)"):
        chamfer(x[:, 0], y)
    with pytest.raises(ValueError, match=r"a_mask must have shape \[batch, set_size\].*got shape \(3, 3\)"):
        max_similarity(x, y, a_mask=x_mask[:, :3])
    for alpha in (0.0, np.float32(0), -1, float("nan"), np.float64("inf")):
        with pytest.raises(ValueError, match=r"^alpha must be a finite number > 0; got "):
            smooth_chamfer(x, y, alpha=alpha)
    with pytest.raises(ValueError, match=r"^alpha must be a number > 0; got True"):
        smooth_chamfer(x, y, alpha=True)
    scores, positives = np.eye(3, dtype="float32"), np.eye(3, dtype=bool)
    for temperature in (np.float32(0), float("nan")):
        with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0"):
            info_nce_loss(scores, positives, temperature=temperature)
    for margin in (-0.1, np.float32("nan")):
        with pytest.raises(ValueError, match=r"^margin must be a finite number >= 0"):
            triplet_loss(scores, positives, margin=margin)


# ---------------------------------------------------------------- triplet


def np_triplet(s, pos, margin, hardest, reduction):
    i2t, t2i = [], []
    for i, c in zip(*np.nonzero(pos)):
        neg_c = [s[i, c2] for c2 in range(s.shape[1]) if not pos[i, c2]]
        neg_i = [s[j, c] for j in range(s.shape[0]) if not pos[j, c]]
        v_i2t = [max(0.0, margin + v - s[i, c]) for v in neg_c] or [0.0]
        v_t2i = [max(0.0, margin + v - s[i, c]) for v in neg_i] or [0.0]
        i2t.append(max(v_i2t) if hardest else sum(v_i2t))
        t2i.append(max(v_t2i) if hardest else sum(v_t2i))
    if reduction == "sum":
        return sum(i2t) + sum(t2i)
    return np.mean(i2t) + np.mean(t2i)


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triplet_several_positives_matches_numpy(rng, hardest, reduction):
    image_ids = np.arange(4)
    caption_ids = np.repeat(image_ids, 3)  # 3 captions per image, DivE layout
    positives = image_ids[:, None] == caption_ids[None, :]
    s = rng.uniform(-1, 1, size=(4, 12)).astype("float32")
    out = triplet_loss(s, positives, margin=0.2, hardest=hardest, reduction=reduction).numpy()
    np.testing.assert_allclose(out, np_triplet(s.astype("float64"), positives, 0.2, hardest, reduction), rtol=1e-5)
    # positives given as 0/1 floats give the same
    out01 = triplet_loss(s, positives.astype("float32"), margin=0.2, hardest=hardest, reduction=reduction).numpy()
    np.testing.assert_allclose(out01, out, rtol=1e-6)


def test_triplet_all_negatives_with_ties_and_unequal_groups(rng):
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])  # caption -> image, 1 to 4 captions per image
    positives = np.arange(5)[:, None] == groups[None, :]
    s = np.round(rng.uniform(-1, 1, size=(5, 11)), 1).astype("float32")  # many exact ties, also with S - m
    for reduction in ("mean", "sum"):
        out = triplet_loss(s, positives, margin=0.2, hardest=False, reduction=reduction).numpy()
        np.testing.assert_allclose(out, np_triplet(s.astype("float64"), positives, 0.2, False, reduction), rtol=1e-5)


def test_triplet_all_negatives_gradient_matches_numpy(rng):
    groups = np.repeat(np.arange(4), 2)
    positives = np.arange(4)[:, None] == groups[None, :]
    s = rng.uniform(-1, 1, size=(4, 8)).astype("float32")
    expected = np.zeros_like(s, dtype="float64")  # d/dS of sum over pairs of sum over negatives of the hinge
    for i, c in zip(*np.nonzero(positives)):
        for c2 in np.nonzero(~positives[i])[0]:
            if 0.5 + s[i, c2] - s[i, c] > 0:
                expected[i, c2] += 1
                expected[i, c] -= 1
        for j in np.nonzero(~positives[:, c])[0]:
            if 0.5 + s[j, c] - s[i, c] > 0:
                expected[j, c] += 1
                expected[i, c] -= 1
    s_t = tf.constant(s)
    with tf.GradientTape() as tape:
        tape.watch(s_t)
        loss = triplet_loss(s_t, positives, margin=0.5, hardest=False, reduction="sum")
    np.testing.assert_allclose(tape.gradient(loss, s_t).numpy(), expected, atol=1e-5)


def test_triplet_equals_vse_infty_and_dive_formulas(rng):
    s = rng.uniform(-1, 1, size=(5, 5)).astype("float64")
    eye = np.eye(5, dtype=bool)
    # VSE++ / VSE infinity: sum over the batch, hardest negatives, diagonal positives
    cost_s = np.where(eye, 0, np.maximum(0, 0.2 + s - np.diag(s)[:, None]))
    cost_im = np.where(eye, 0, np.maximum(0, 0.2 + s - np.diag(s)[None, :]))
    vse = cost_s.max(1).sum() + cost_im.max(0).sum()
    np.testing.assert_allclose(triplet_loss(s, None, reduction="sum").numpy(), vse, rtol=1e-5)
    np.testing.assert_allclose(triplet_loss(s, eye, reduction="sum").numpy(), vse, rtol=1e-5)
    vse0 = cost_s.sum() + cost_im.sum()
    np.testing.assert_allclose(triplet_loss(s, eye, hardest=False, reduction="sum").numpy(), vse0, rtol=1e-5)
    # DivE: mean over (image, positive) pairs and over captions, summed
    dive = cost_s.max(1).mean() + cost_im.max(0).mean()
    np.testing.assert_allclose(triplet_loss(s, eye, reduction="mean").numpy(), dive, rtol=1e-5)


def test_triplet_gradient_and_edge_cases(rng):
    s = tf.constant(rng.uniform(-1, 1, size=(3, 6)).astype("float32"))
    all_positive = np.ones((3, 6), bool)  # no negatives anywhere -> 0
    assert triplet_loss(s, all_positive).numpy() == 0.0
    no_positive = np.zeros((3, 6), bool)
    assert triplet_loss(s, no_positive).numpy() == 0.0
    positives = np.repeat(np.eye(3, dtype=bool), 2, axis=1)
    with tf.GradientTape() as tape:
        tape.watch(s)
        loss = triplet_loss(s, positives, margin=2.0)  # a large margin: every hardest negative is active
    grad = tape.gradient(loss, s).numpy()
    assert np.all(np.isfinite(grad)) and np.all(grad[positives] < 0)


def test_triplet_errors(rng):
    s = rng.uniform(size=(3, 6))
    with pytest.raises(ValueError, match=r"positive_mask must have the shape of similarity \(3, 6\); got shape \(3, 5\)"):
        triplet_loss(s, np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"similarity must have shape \[num_queries, num_candidates\]"):
        triplet_loss(s[0], np.ones(6))
    with pytest.raises(ValueError, match=r"reduction must be"):
        triplet_loss(s, np.ones((3, 6)), reduction="avg")
    with pytest.raises(ValueError, match=r"positive_mask may be None .* got similarity shape \(3, 6\)"):
        triplet_loss(s, None)


# ---------------------------------------------------------------- InfoNCE


def np_info_nce(s, pos, t):
    def direction(s, pos):
        losses = []
        for row, p in zip(s / t, pos):
            if p.any():
                losses.append(-np.log(np.exp(row[p]).sum() / np.exp(row).sum()))
        return np.mean(losses) if losses else 0.0

    return 0.5 * (direction(s, pos) + direction(s.T, pos.T))


def test_info_nce_matches_numpy(rng):
    s = rng.uniform(-1, 1, size=(4, 9)).astype("float32")
    positives = np.zeros((4, 9), bool)
    positives[0, [0, 1]] = positives[1, [2, 3, 4]] = positives[2, 5] = True  # image 3 and captions 6-8: none
    out = info_nce_loss(s, positives, temperature=0.1).numpy()
    np.testing.assert_allclose(out, np_info_nce(s.astype("float64"), positives, 0.1), rtol=1e-5)
    diag = rng.uniform(-1, 1, size=(5, 5)).astype("float32")
    np.testing.assert_allclose(
        info_nce_loss(diag, np.eye(5), temperature=0.05).numpy(),
        np_info_nce(diag.astype("float64"), np.eye(5, dtype=bool), 0.05),
        rtol=1e-5,
    )
    assert info_nce_loss(s, np.zeros((4, 9)), temperature=0.05).numpy() == 0.0


# ---------------------------------------------------------------- MMD


def np_mmd(x, y, gamma):
    def mean_kernel(a, b):
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
        return np.exp(-gamma * d).mean()

    return mean_kernel(x, x) - 2 * mean_kernel(x, y) + mean_kernel(y, y)


def test_mmd_matches_numpy(rng):
    x = unit(rng, 3, 2, 8)
    y = unit(rng, 7, 8)
    out = mmd_loss(x, y, gamma=0.5).numpy()
    np.testing.assert_allclose(out, np_mmd(x.reshape(6, 8).astype("float64"), y.astype("float64"), 0.5), atol=2e-6)
    x_mask = np.array([[1, 1], [1, 0], [0, 1]])
    y_mask = np.array([1, 1, 0, 1, 1, 0, 1])
    x_pad = np.where(x_mask[..., None] > 0, x, np.nan).astype("float32")
    out = mmd_loss(x_pad, y, gamma=1.5, x_mask=x_mask, y_mask=y_mask).numpy()
    expected = np_mmd(x[x_mask != 0].astype("float64"), y[y_mask != 0].astype("float64"), 1.5)
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_mmd_finite_gradient_with_identical_points(rng):
    points = unit(rng, 4, 8)
    x = tf.constant(np.concatenate([points, points[:1]]))  # a duplicate inside x
    y = tf.constant(points)  # and y == x's points
    with tf.GradientTape() as tape:
        tape.watch([x, y])
        loss = mmd_loss(x, y, gamma=0.5)
    grads = tape.gradient(loss, [x, y])
    assert np.isfinite(loss.numpy())
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    np.testing.assert_allclose(mmd_loss(points, points).numpy(), 0.0, atol=1e-6)


def test_mmd_errors(rng):
    with pytest.raises(ValueError, match=r"same dim D.*D=8 and D=6"):
        mmd_loss(np.ones((3, 8)), np.ones((2, 6)))
    with pytest.raises(ValueError, match=r"x_mask must have shape \(3, 2\) to match x; got shape \(3,\)"):
        mmd_loss(np.ones((3, 2, 8)), np.ones((2, 8)), x_mask=np.ones(3))
    with pytest.raises(ValueError, match=r"y must have shape \[num_points, dim\] or \[batch, set_size, dim\]"):
        mmd_loss(np.ones((3, 8)), np.ones(8))


# ---------------------------------------------------------------- diversity


def np_diversity(sets, t, mask=None):
    values = []
    for b, s in enumerate(sets.astype("float64")):
        e = valid_elements(s, None if mask is None else mask[b])
        e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        pairs = [np.exp(-t * ((e[i] - e[j]) ** 2).sum()) for i in range(len(e)) for j in range(i + 1, len(e))]
        if pairs:
            values.append(np.mean(pairs))
    return np.mean(values) if values else 0.0


def test_diversity_matches_numpy(rng):
    sets = rng.normal(size=(3, 4, 8)).astype("float32") * 3.0  # not normalised: the loss normalises
    np.testing.assert_allclose(diversity_loss(sets, t=2.0).numpy(), np_diversity(sets, 2.0), rtol=1e-5)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    padded = np.where(mask[..., None] > 0, sets, np.inf).astype("float32")
    np.testing.assert_allclose(diversity_loss(padded, t=0.5, mask=mask).numpy(), np_diversity(sets, 0.5, mask), rtol=1e-5)
    assert diversity_loss(sets[:, :1]).numpy() == 0.0  # K = 1
    assert diversity_loss(sets, mask=np.eye(4)[:3]).numpy() == 0.0  # one valid element per set
    collapsed = np.repeat(sets[:, :1], 4, axis=1)  # identical elements: the maximum, 1
    np.testing.assert_allclose(diversity_loss(collapsed).numpy(), 1.0, rtol=1e-6)


def test_diversity_gradient_finite_for_collapsed_sets(rng):
    sets = tf.constant(np.repeat(rng.normal(size=(2, 1, 8)), 3, axis=1).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(sets)
        loss = diversity_loss(sets)
    assert np.all(np.isfinite(tape.gradient(loss, sets).numpy()))


def test_losses_trace_with_unknown_shapes(rng, sets):
    """Inside `fit` the batch axes are unknown at trace time: every function must trace with None dimensions."""
    x, y, x_mask, y_mask = sets
    s = rng.uniform(-1, 1, size=(4, 8)).astype("float32")
    positives = np.arange(4)[:, None] == np.repeat(np.arange(4), 2)[None, :]
    spec3, spec2 = tf.TensorSpec([None, None, None]), tf.TensorSpec([None, None])

    @tf.function(input_signature=[spec3, spec3, spec2, spec2, spec2, tf.TensorSpec([None, None], tf.bool)])
    def all_losses(x, y, x_mask, y_mask, s, positives):
        return [
            smooth_chamfer(x, y, a_mask=x_mask, b_mask=y_mask),
            triplet_loss(s, positives, hardest=True),
            triplet_loss(s, positives, hardest=False),
            info_nce_loss(s, positives),
            mmd_loss(x, y, x_mask=x_mask, y_mask=y_mask),
            diversity_loss(x, mask=x_mask),
        ]

    got = all_losses(x, y, x_mask.astype("float32"), y_mask.astype("float32"), s, positives)
    np.testing.assert_allclose(got[0].numpy(), np_smooth_chamfer(x, y, 16.0, x_mask, y_mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), np_triplet(s.astype("float64"), positives, 0.2, True, "mean"), rtol=1e-5)
    np.testing.assert_allclose(got[2].numpy(), np_triplet(s.astype("float64"), positives, 0.2, False, "mean"), rtol=1e-5)
    np.testing.assert_allclose(got[3].numpy(), np_info_nce(s.astype("float64"), positives, 0.05), rtol=1e-5)
    expected_mmd = np_mmd(x[x_mask != 0].astype("float64"), y[y_mask != 0].astype("float64"), 0.5)
    np.testing.assert_allclose(got[4].numpy(), expected_mmd, atol=2e-6)
    np.testing.assert_allclose(got[5].numpy(), np_diversity(x, 2.0, x_mask), rtol=1e-5)


def test_the_01_names_in_losses_give_the_same_numbers(sets):
    """`tfemde.losses.smooth_chamfer_similarity` & co. (old argument names) stay for one release, same results."""
    x, y, x_mask, y_mask = sets
    for old, new in ((losses.smooth_chamfer_similarity, smooth_chamfer), (losses.chamfer_similarity, chamfer),
                     (losses.max_similarity, max_similarity)):
        np.testing.assert_array_equal(old(x, y, x_mask=x_mask, y_mask=y_mask).numpy(),
                                      new(x, y, a_mask=x_mask, b_mask=y_mask).numpy())


# ------------------------------------------------------------------------------------------ centroid triplet
def test_centroid_triplet_loss_against_numpy(rng):
    """Re-derived per anchor in NumPy: leave-one-out per-slot centroid of its class as the positive, the most
    similar other class's centroid as the negative, scored with the serving (NumPy) similarity; sketches averaged
    (and their rows normalised: the Keras similarity takes row cosines)."""
    from tfemde.serving import Embeddings, similarity as numpy_similarity
    from tfemde.similarity import similarity as keras_similarity

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    sets = unit(rng.normal(size=(9, 3, 6))).astype("float32")
    sketches = unit(rng.uniform(size=(9, 2, 4))).reshape(9, 8).astype("float32")  # unit rows, as encoders emit
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4])  # classes 2 and 4 have one member: no positive, not anchors
    margin, alpha, weight = 0.3, 16.0, 0.5
    got = float(losses.centroid_triplet_loss(
        lambda a, b: keras_similarity(a, b, alpha=alpha, sketch_weight=weight, sketch_depth=2),
        sets, labels, sketches=sketches, margin=margin))

    def score(x_set, x_sketch, c_set, c_sketch):
        c_sketch = unit(c_sketch.reshape(2, 4)).reshape(-1)  # the mean's rows again unit: cosines per partition
        return float(numpy_similarity(Embeddings(x_set[None], x_sketch[None], sketch_depth=2),
                                      Embeddings(c_set[None], c_sketch[None], sketch_depth=2),
                                      alpha=alpha, sketch_weight=weight)[0, 0])

    terms = []
    for i in range(len(labels)):
        mates = [j for j in range(len(labels)) if labels[j] == labels[i] and j != i]
        if not mates:
            continue
        positive = score(sets[i], sketches[i], unit(sets[mates].mean(axis=0)), sketches[mates].mean(axis=0))
        negatives = [score(sets[i], sketches[i], unit(sets[labels == c].mean(axis=0)),
                           sketches[labels == c].mean(axis=0)) for c in set(labels) - {labels[i]}]
        terms.append(max(margin + max(negatives) - positive, 0.0))
    assert len(terms) == 7
    assert got == pytest.approx(np.mean(terms), abs=1e-5)
    # one member a class everywhere: no anchor, a loss of 0 (not NaN)
    alone = losses.centroid_triplet_loss(lambda a, b: keras_similarity(a, b), sets[:4], np.arange(4))
    assert float(alone) == 0.0


def test_centroid_loss_in_the_dual_encoder_moves_images_of_a_group_together(rng):
    """A DualEncoder with centroid_weight adds the term on its image sets by group_id: the loss differs from the
    same model without it by exactly weight x the term, and every image-tower weight gets its gradient."""
    from tfemde.models import build_dual_encoder

    kwargs = dict(embed_dim=16, word_dim=8, vocab_size=40, max_length=8, num_slots=2, set_depth=1, set_heads=2,
                  sketch_depth=2, sketch_bits=3, image_size=16, cnn_filters=(4, 8), dropout=0.0)
    plain = build_dual_encoder("dive_temde", **kwargs)
    with_centroids = build_dual_encoder("dive_temde", centroid_weight=0.5, **kwargs)
    with_centroids.set_weights(plain.get_weights())
    batch = {"image": rng.uniform(size=(8, 16, 16, 3)).astype("float32"),
             "caption_ids": rng.integers(3, 40, (8, 6)).astype("int32"), "caption_mask": np.ones((8, 6), bool),
             "image_id": np.arange(8), "group_id": np.array([0, 0, 1, 1, 2, 2, 3, 3])}
    outputs = plain(batch, training=False)
    term = losses.centroid_triplet_loss(plain.similarity, outputs["image_set"], batch["group_id"],
                                        sketches=outputs["image_sketch"], margin=plain.config.margin)
    difference = float(with_centroids.compute_loss(batch, y_pred=outputs)) - float(plain.compute_loss(
        batch, y_pred=outputs))
    assert float(term) > 0 and difference == pytest.approx(0.5 * float(term), abs=1e-5)
    with tf.GradientTape() as tape:
        trained = plain(batch, training=True)
        loss = losses.centroid_triplet_loss(plain.similarity, trained["image_set"], batch["group_id"],
                                            sketches=trained["image_sketch"], margin=0.2)
    image_weights = [v for v in plain.trainable_variables if v.path.startswith("image_conv")]
    gradients = tape.gradient(loss, image_weights)
    assert image_weights and all(g is not None and np.any(g.numpy()) for g in gradients)
