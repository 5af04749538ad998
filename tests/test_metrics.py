"""Retrieval metrics and protocols against hand-computed values and a brute-force per-query ranking."""

import numpy as np
import pytest

from tfemde.evaluation import (METRIC_KEYS, coco1k, full, metrics_line, protocol_metrics, retrieval_metrics,
                               retrieval_ranks)
from tfemde.serving import Embeddings


# -- independent reference ------------------------------------------------------------------------------------------
def brute_rank(scores, positive):
    """Sort the candidates by score, non-matches first among equal scores; the rank is the first match's position."""
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], bool(positive[c])))
    return next(pos for pos, c in enumerate(order) if positive[c])


def brute_metrics(sim, caption_item, groups=None):
    n_items, n_caps = sim.shape
    groups = np.arange(n_items) if groups is None else np.asarray(groups)
    caption_item = np.asarray(caption_item)
    i2t = [brute_rank(sim[i], groups[caption_item] == groups[i]) for i in range(n_items) if (caption_item == i).any()]
    t2i = [brute_rank(sim[:, c], groups == groups[caption_item[c]]) for c in range(n_caps)]
    m = {}
    for name, ranks in (("i2t", np.array(i2t)), ("t2i", np.array(t2i))):
        for k in (1, 5, 10):
            m[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        m[f"{name}_medr"] = np.floor(np.median(ranks)) + 1
        m[f"{name}_meanr"] = ranks.mean() + 1
    m["rsum"] = sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return m


def brute_similarity(a, b, alpha, sketch_weight=0.0):
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            c = alpha * a.sets[i].astype(np.float64) @ b.sets[j].astype(np.float64).T
            lse_x = np.log(np.exp(c - c.max(1, keepdims=True)).sum(1)) + c.max(1)
            lse_y = np.log(np.exp(c - c.max(0, keepdims=True)).sum(0)) + c.max(0)
            out[i, j] = lse_x.mean() / (2 * alpha) + lse_y.mean() / (2 * alpha)
            if sketch_weight:
                out[i, j] += sketch_weight * a.sketches[i] @ b.sketches[j] / a.sketch_depth
    return out


def assert_metrics_close(got, want):
    assert tuple(got) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def embeddings(rng, n, k=2, d=8, depth=2, width=3):
    x = rng.normal(size=(n, k, d))
    s = rng.random((n, depth, width))
    return Embeddings((x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32),
                      sketches=(s / np.linalg.norm(s, axis=-1, keepdims=True)).astype(np.float32))


# -- hand-made matrices ---------------------------------------------------------------------------------------------
SIM = np.array([
    [0.5, 0.2, 0.5, 0.1],  # item 0: captions 0, 1
    [0.3, 0.3, 0.3, 0.9],  # item 1: caption 2
    [0.0, 0.0, 0.0, 0.0],  # item 2: caption 3
    [0.9, 0.9, 0.9, 0.9],  # item 3: no caption, not an i2t query
])
CAPTION_ITEM = [0, 0, 1, 2]


def test_hand_computed_ties_count_against_the_model():
    i2t, t2i, queries = retrieval_ranks(SIM, CAPTION_ITEM)
    np.testing.assert_array_equal(queries, [0, 1, 2])
    np.testing.assert_array_equal(i2t, [1, 3, 3])  # item 0: caption 2 ties its best caption and ranks ahead
    np.testing.assert_array_equal(t2i, [1, 2, 2, 3])
    m = retrieval_metrics(SIM, CAPTION_ITEM)
    want = dict(i2t_r1=0.0, i2t_r5=100.0, i2t_r10=100.0, t2i_r1=0.0, t2i_r5=100.0, t2i_r10=100.0, rsum=400.0,
                i2t_medr=4.0, t2i_medr=3.0, i2t_meanr=7 / 3 + 1, t2i_meanr=3.0)
    assert_metrics_close(m, want)


def test_hand_computed_groups():
    groups = ["a", "a", "b", "c"]  # items 0 and 1 match each other's captions
    i2t, t2i, _ = retrieval_ranks(SIM, CAPTION_ITEM, groups)
    np.testing.assert_array_equal(i2t, [0, 1, 3])
    np.testing.assert_array_equal(t2i, [1, 1, 1, 3])
    m = retrieval_metrics(SIM, CAPTION_ITEM, groups=groups)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert (m["i2t_medr"], m["t2i_medr"], m["t2i_meanr"]) == (2.0, 2.0, 2.5)


@pytest.mark.parametrize("with_groups", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_many_ties(with_groups, seed):
    rng = np.random.default_rng(seed)
    n_items, n_caps = 14, 30
    sim = rng.integers(0, 4, size=(n_items, n_caps)).astype(np.float32)  # scores from 4 values: ties everywhere
    caption_item = rng.integers(0, n_items - 3, size=n_caps)  # the last 3 items have no caption
    groups = rng.integers(0, 6, size=n_items) if with_groups else None
    assert_metrics_close(retrieval_metrics(sim, caption_item, groups), brute_metrics(sim, caption_item, groups))


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("seed", [3, 4])
def test_matches_brute_force_in_small_rank_blocks(monkeypatch, dense, seed):
    import tfemde.evaluation.metrics as evaluation

    monkeypatch.setattr(evaluation, "_RANK_BLOCK", 7)  # a few rows / columns per block
    if dense:  # the fallback for huge groups: dense match masks instead of listed matching pairs
        monkeypatch.setattr(evaluation, "_MAX_PAIRS_PER_QUERY", 0)
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, 5, size=(9, 20)).astype(np.float32)
    caption_item = rng.integers(0, 8, size=20)
    groups = rng.integers(0, 4, size=9)
    for g in (None, groups):
        assert_metrics_close(retrieval_metrics(sim, caption_item, g, progress=True),
                             brute_metrics(sim, caption_item, g))


def test_medr_floors_an_even_median():
    sim = np.eye(4)[:, [0, 1, 2, 3]]
    sim[1] = [0.5, 0.4, 0, 0]  # item 1 rank 1
    sim[2] = [0.5, 0.5, 0.2, 0]  # item 2 rank 2
    sim[3] = [0.5, 0.5, 0.5, 0.1]  # item 3 rank 3
    m = retrieval_metrics(sim, [0, 1, 2, 3])
    assert m["i2t_medr"] == 2.0  # ranks 0, 1, 2, 3: median 1.5 -> floor 1 -> + 1
    assert m["i2t_meanr"] == 2.5


# -- protocols ------------------------------------------------------------------------------------------------------
def test_full_protocol_equals_brute_force(rng):
    images = embeddings(rng, 6)
    caption_item = np.array([0, 0, 1, 2, 2, 2, 3, 5, 4, 1])
    captions = embeddings(rng, len(caption_item))
    got = full(images, captions, caption_item, alpha=16.0, sketch_weight=0.5, chunk_size=(4, 3))
    assert_metrics_close(got, brute_metrics(brute_similarity(images, captions, 16.0, 0.5), caption_item))
    assert protocol_metrics("full", images, captions, caption_item, alpha=16.0, sketch_weight=0.5) == pytest.approx(got)


@pytest.mark.parametrize("with_groups", [False, True])
def test_coco1k_averages_five_folds(rng, with_groups):
    fold_size = 4
    n_items = 5 * fold_size
    caption_item = rng.permutation(np.repeat(np.arange(n_items), 2))  # captions in any order
    images, captions = embeddings(rng, n_items), embeddings(rng, len(caption_item))
    groups = rng.integers(0, 8, size=n_items) if with_groups else None
    mean, folds = coco1k(images, captions, caption_item, groups=groups, alpha=16.0, sketch_weight=0.3,
                         fold_size=fold_size, return_folds=True, progress=True)
    want_folds = []
    for f in range(5):
        items = np.arange(f * fold_size, (f + 1) * fold_size)
        caps = np.flatnonzero(np.isin(caption_item, items))
        sim = brute_similarity(images.take(items), captions.take(caps), 16.0, 0.3)
        want_folds.append(brute_metrics(sim, caption_item[caps] - f * fold_size,
                                        None if groups is None else groups[items]))
    for got_fold, want_fold in zip(folds, want_folds):
        assert_metrics_close(got_fold, want_fold)
    assert_metrics_close(mean, {k: np.mean([w[k] for w in want_folds]) for k in METRIC_KEYS})
    assert coco1k(images, captions, caption_item, groups=groups, alpha=16.0, sketch_weight=0.3,
                  fold_size=fold_size) == pytest.approx(mean)


def test_metrics_line():
    line = metrics_line(retrieval_metrics(SIM, CAPTION_ITEM))
    assert line.startswith("i2t R@1 0.0 R@5 100.0") and "rsum 400.0" in line


# -- errors ---------------------------------------------------------------------------------------------------------
def test_errors(rng):
    with pytest.raises(ValueError, match=r"similarity must have shape \[N_items, N_captions\]; got shape \(4,\)"):
        retrieval_metrics(np.zeros(4), [0])
    with pytest.raises(ValueError, match=r"caption_item must have shape \[N_captions\] = \(4,\).*got shape \(3,\)"):
        retrieval_metrics(SIM, [0, 1, 2])
    with pytest.raises(ValueError, match=r"caption_item must index items 0..3"):
        retrieval_metrics(SIM, [0, 1, 2, 4])
    with pytest.raises(ValueError, match="int item indices"):
        retrieval_metrics(SIM, [0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"groups must have shape \[N_items\] = \(4,\)"):
        retrieval_metrics(SIM, CAPTION_ITEM, groups=[0, 1])
    bad = SIM.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        retrieval_metrics(bad, CAPTION_ITEM)
    images, captions = embeddings(rng, 12), embeddings(rng, 12)
    with pytest.raises(ValueError, match=r"exactly num_folds \* fold_size = 5 \* 2 = 10 items; got 12"):
        coco1k(images, captions, np.arange(12), fold_size=2)
    with pytest.raises(ValueError, match=r"caption_item must have shape \[N_captions\] = \(12,\)"):
        full(images, captions, np.arange(5))
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocol_metrics("coco5k", images, captions, np.arange(12))


def test_concept_ranks_against_a_loop_with_ties(rng):
    from tfemde.evaluation import concept_ranks

    item_group = np.array([0, 0, 1, 2, 2, 2, 3])
    query_group = np.array([0, 1, 2, 3, 2])
    sim = rng.integers(0, 4, size=(5, 7)).astype(np.float32)  # many ties
    want = []
    for q, g in enumerate(query_group):
        best = max(sim[q, i] for i in range(7) if item_group[i] == g)
        want.append(sum(1 for i in range(7) if item_group[i] != g and sim[q, i] >= best))
    np.testing.assert_array_equal(concept_ranks(sim, query_group, item_group), want)
    with pytest.raises(ValueError, match=r"similarity must have shape \[Q, N_items\] = \(5, 7\)"):
        concept_ranks(sim[:, :6], query_group, item_group)
    with pytest.raises(ValueError, match="at least one item"):
        concept_ranks(sim, np.array([0, 1, 2, 3, 9]), item_group)


def test_concept_names_take_each_groups_first_captioned_item():
    from tfemde.data import Dataset
    from tfemde.evaluation import concept_names

    data = Dataset(name="t", captions=["b0", "c-first", "c-second", "a1", "a0"], caption_item=[1, 3, 3, 2, 0],
                   item_split=["train", "train", "test", "test", "val"], item_group=[7, 7, 5, 4, 9],
                   images=np.zeros((5, 2, 2, 3), np.uint8))
    names, groups, splits = concept_names(data)
    assert names == ["a0", "a1", "c-first"]  # group 9 (item 4) has no caption: no query
    assert groups.tolist() == [7, 5, 4] and splits.tolist() == ["train", "test", "test"]


# ------------------------------------------------------------------------------------- image-to-image retrieval
def _reference_image_metrics(sim, query_group, gallery_group):
    """Per query, plain Python: rank of every gallery item (ties: irrelevant first), AP, hits in the top K."""
    aps, hits = [], {1: [], 5: [], 10: []}
    for q in range(len(sim)):
        relevant = [g == query_group[q] for g in gallery_group]
        if not any(relevant):
            continue
        ranked = sorted(range(len(gallery_group)), key=lambda j: (-sim[q][j], relevant[j]))
        found, precisions = 0, []
        for position, j in enumerate(ranked, 1):
            if relevant[j]:
                found += 1
                precisions.append(found / position)
        aps.append(sum(precisions) / len(precisions))
        for k in hits:
            hits[k].append(any(relevant[j] for j in ranked[:k]))
    return 100 * np.mean(aps), {k: 100 * np.mean(v) for k, v in hits.items()}, len(aps)


def test_image_retrieval_metrics_against_a_plain_reference(rng):
    from tfemde.evaluation import image_retrieval_metrics

    for trial in range(5):
        queries, gallery = 40, 60
        query_group = rng.integers(0, 25, queries)
        gallery_group = rng.integers(0, 20, gallery)  # groups 20..24 have no gallery item: skipped
        sim = np.round(rng.normal(size=(queries, gallery)), 1)  # rounding makes ties
        got = image_retrieval_metrics(sim, query_group, gallery_group)
        ap, hits, counted = _reference_image_metrics(sim, query_group, gallery_group)
        assert got["map"] == pytest.approx(ap, abs=1e-4)
        for k in (1, 5, 10):
            assert got[f"r{k}"] == pytest.approx(hits[k], abs=1e-4)
        assert got["queries"] == counted and got["skipped"] == queries - counted
    # a perfect ranking, and ties that count against the model
    perfect = image_retrieval_metrics(np.eye(3), [0, 1, 2], [0, 1, 2])
    assert perfect["map"] == perfect["r1"] == 100.0
    tied = image_retrieval_metrics(np.ones((1, 2)), [0], [1, 0])
    assert tied["r1"] == 0.0 and tied["map"] == 50.0
    with pytest.raises(ValueError, match=r"similarity must have shape \[Q, G\] = \(2, 3\)"):
        image_retrieval_metrics(np.ones((3, 2)), [0, 1], [0, 1, 2])
