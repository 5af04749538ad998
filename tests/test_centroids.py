"""Class centroids for galleries (tfemde.serving.centroids), checked against plain NumPy re-derivations."""

import numpy as np
import pytest

from tfemde.serving import Embeddings, SetIndex
from tfemde.serving.centroids import METHODS, group_centroids
from tfemde.serving.similarity import smooth_chamfer


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def classes(rng):
    """12 classes of 1-5 images, K = 3 unit elements of D = 8 each, members near their class's three prototypes."""
    prototypes = unit(rng.normal(size=(12, 3, 8)))
    groups = np.concatenate([[c] * rng.integers(1, 6) for c in range(12)])
    rng.shuffle(groups)
    sets = unit(prototypes[groups] + 0.2 * rng.normal(size=(len(groups), 3, 8))).astype("float32")
    sketches = unit(rng.uniform(size=(len(groups), 2, 4))).reshape(len(groups), 8).astype("float32")
    return Embeddings(sets, sketches=sketches, sketch_depth=2), groups * 10 + 3  # ids that are not 0..C-1


def test_vector_heads_are_the_normalised_mean(rng):
    vectors = unit(rng.normal(size=(7, 1, 5))).astype("float32")
    groups = np.array([4, 1, 4, 4, 9, 1, 9])
    centroids, ids = group_centroids(Embeddings(vectors), groups, method="kmeans")  # K = 1: the mean whatever asked
    assert ids.tolist() == [4, 1, 9]  # in order of first appearance
    for row, g in enumerate(ids):
        expected = vectors[groups == g, 0].mean(axis=0)
        np.testing.assert_allclose(centroids.sets[row, 0], expected / np.linalg.norm(expected), atol=1e-6)


def test_slot_mean_union_and_kmeans(classes):
    embeddings, groups = classes
    n, k, d = embeddings.sets.shape
    slot, ids = group_centroids(embeddings, groups, "slot_mean")
    union, union_ids = group_centroids(embeddings, groups, "union")
    kmeans, kmeans_ids = group_centroids(embeddings, groups, "kmeans")
    assert ids.tolist() == union_ids.tolist() == kmeans_ids.tolist() and len(ids) == 12
    for row, g in enumerate(ids):
        members = embeddings.sets[groups == g]
        mean = members.mean(axis=0)
        np.testing.assert_allclose(slot.sets[row], mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-6)
        mean_sketch = embeddings.sketches[groups == g].mean(axis=0).reshape(2, 4)
        np.testing.assert_allclose(slot.sketches[row], unit(mean_sketch).reshape(-1), atol=1e-6)
        # union: every member element once, the rest masked
        size = len(members) * k
        np.testing.assert_array_equal(union.sets[row, :size], members.reshape(-1, d))
        assert union.set_mask[row, :size].all() and not union.set_mask[row, size:].any()
        # kmeans: K unit centres, each the normalised mean of the elements nearest to it (a Lloyd fixed point)
        points = members.reshape(-1, d)
        valid = kmeans.set_mask is None or kmeans.set_mask[row].all()
        centres = kmeans.sets[row] if valid else kmeans.sets[row][kmeans.set_mask[row]]
        np.testing.assert_allclose(np.linalg.norm(centres, axis=-1), 1.0, atol=1e-5)
        if len(points) > k:
            assign = np.argmax(points @ centres.T, axis=1)
            for c in range(len(centres)):
                if (assign == c).any():
                    target = points[assign == c].sum(axis=0)
                    np.testing.assert_allclose(centres[c], target / np.linalg.norm(target), atol=1e-4)
    # the union's Smooth-Chamfer to a query is the score against the class's images put together
    query = embeddings.sets[:2]
    direct = smooth_chamfer(query, union.sets[:1], alpha=16.0, b_mask=union.set_mask[:1])
    members = embeddings.sets[groups == ids[0]].reshape(1, -1, d)
    np.testing.assert_allclose(direct, smooth_chamfer(query, members, alpha=16.0), atol=1e-5)


def test_a_centroid_gallery_finds_the_class_with_one_entry_a_class(classes):
    """Queries near a class's prototypes find its centroid first with every method, in a SetIndex of C entries."""
    embeddings, groups = classes
    for method in METHODS:
        centroids, ids = group_centroids(embeddings, groups, method)
        index = SetIndex(alpha=16.0)
        index.add(centroids, ids=ids)
        assert len(index) == 12
        found, _ = index.search(embeddings, k=1)
        assert (found[:, 0] == groups).mean() > 0.95, method


def test_errors(classes):
    embeddings, groups = classes
    with pytest.raises(ValueError, match="method must be one of slot_mean, kmeans, union; got 'median'"):
        group_centroids(embeddings, groups, "median")
    with pytest.raises(ValueError, match=r"groups must have shape \[N\]"):
        group_centroids(embeddings, groups[:-1])
