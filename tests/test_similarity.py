"""`tfemde.similarity` (Keras ops, what the model trains with) against `tfemde.serving.similarity` (NumPy, what an
export serves with): same names, same arguments, same numbers."""

import numpy as np
import pytest

from tfemde import serving, similarity


def unit(rng, *shape):
    v = rng.normal(size=shape)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype("float32")


@pytest.fixture
def batches(rng):
    depth, width = 4, 8
    a = {"set": unit(rng, 3, 4, 16), "sketch": unit(rng, 3, depth, width).reshape(3, -1)}
    b = {"set": unit(rng, 5, 2, 16), "sketch": unit(rng, 5, depth, width).reshape(5, -1)}
    a_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    b_mask = np.array([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0]], bool)
    return a, b, a_mask, b_mask, depth


def test_smooth_chamfer_agrees_with_serving(batches):
    a, b, a_mask, b_mask, _ = batches
    for alpha in (4.0, 16.0):
        want = serving.smooth_chamfer(a["set"], b["set"], alpha=alpha, a_mask=a_mask, b_mask=b_mask)
        got = similarity.smooth_chamfer(a["set"], b["set"], alpha=alpha, a_mask=a_mask, b_mask=b_mask)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_sketch_similarity_agrees_with_serving(batches):
    a, b, _, _, depth = batches
    want = serving.sketch_similarity(a["sketch"], b["sketch"], depth, weight=0.5)
    got = similarity.sketch_similarity(a["sketch"], b["sketch"], depth, weight=0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="depth must be a positive divisor of the sketch size 32; got 3"):
        similarity.sketch_similarity(a["sketch"], b["sketch"], 3)


def test_similarity_agrees_with_serving_with_and_without_the_sketch(batches):
    a, b, _, _, depth = batches
    a_emb = serving.Embeddings(a["set"], sketches=a["sketch"], sketch_depth=depth)
    b_emb = serving.Embeddings(b["set"], sketches=b["sketch"], sketch_depth=depth)
    for weight in (0.0, 0.5):
        want = serving.similarity(a_emb, b_emb, alpha=16.0, sketch_weight=weight)
        got = similarity.similarity(a, b, alpha=16.0, sketch_weight=weight, sketch_depth=depth)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(similarity.similarity(a, b, sketch_weight=0.5, sketch_depth=depth),
                           similarity.similarity(a, b))  # the sketch term is really added
    with pytest.raises(ValueError, match="sketch_weight != 0 needs a 'sketch' in both a and b and sketch_depth"):
        similarity.similarity({"set": a["set"]}, b, sketch_weight=0.5, sketch_depth=depth)
