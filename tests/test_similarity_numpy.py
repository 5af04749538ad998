"""tfemde.serving similarity and Embeddings against a per-pair NumPy re-derivation of ALGORITHMS.md §3.3 / §5.3."""

import importlib
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

from tfemde.serving import Embeddings, similarity, sketch_similarity, smooth_chamfer

sim_module = importlib.import_module("tfemde.serving.similarity")
workers = importlib.import_module("tfemde.serving.workers")


# -- independent reference ------------------------------------------------------------------------------------------
def _logsumexp(v, axis):
    m = v.max(axis=axis, keepdims=True)
    return (np.log(np.exp(v - m).sum(axis=axis, keepdims=True)) + m).squeeze(axis)


def brute_smooth_chamfer(a, b, alpha, a_mask=None, b_mask=None):
    """s(X, Y) = 1/(2α|X|) Σ_x log Σ_y e^{α<x,y>} + 1/(2α|Y|) Σ_y log Σ_x e^{α<x,y>}, one pair at a time, float64."""
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            x = np.asarray(a[i], np.float64)
            y = np.asarray(b[j], np.float64)
            if a_mask is not None:
                x = x[np.asarray(a_mask[i], bool)]
            if b_mask is not None:
                y = y[np.asarray(b_mask[j], bool)]
            if len(x) == 0 or len(y) == 0:
                continue
            logits = alpha * (x @ y.T)
            out[i, j] = (_logsumexp(logits, 1).sum() / (2 * alpha * len(x))
                         + _logsumexp(logits, 0).sum() / (2 * alpha * len(y)))
    return out


def brute_sketch(a, b, depth):
    """Mean over the depth partitionings of the cosine of the matching rows."""
    a = np.asarray(a, np.float64).reshape(len(a), depth, -1)
    b = np.asarray(b, np.float64).reshape(len(b), depth, -1)
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = np.mean([a[i, n] @ b[j, n] / (np.linalg.norm(a[i, n]) * np.linalg.norm(b[j, n]))
                                 for n in range(depth)])
    return out


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def unit_sketch(rng, n, depth, width):
    s = rng.random((n, depth, width))
    return (s / np.linalg.norm(s, axis=-1, keepdims=True)).astype(np.float32)


# -- Smooth-Chamfer -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k_a,k_b", [(1, 1), (2, 2), (4, 4), (3, 1), (2, 4), (5, 7)])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, (2, 5)])
def test_smooth_chamfer_matches_brute_force(rng, k_a, k_b, chunk_size):
    a, b = unit(rng, 7, k_a, 8), unit(rng, 9, k_b, 8)
    got = smooth_chamfer(a, b, alpha=16.0, chunk_size=chunk_size)
    assert got.shape == (7, 9) and got.dtype == np.float32
    np.testing.assert_allclose(got, brute_smooth_chamfer(a, b, 16.0), atol=2e-6)


@pytest.mark.parametrize("chunk_size", [None, 4, (3, 2)])
@pytest.mark.parametrize("k", [1, 4])
def test_similarity_with_sketches_matches_brute_force(rng, chunk_size, k):
    depth, width = 3, 4
    a = Embeddings(unit(rng, 6, k, 8), sketches=unit_sketch(rng, 6, depth, width))
    b = Embeddings(unit(rng, 10, k, 8), sketches=unit_sketch(rng, 10, depth, width).reshape(10, -1),
                   sketch_depth=depth)
    got = similarity(a, b, alpha=16.0, sketch_weight=0.7, chunk_size=chunk_size)
    want = brute_smooth_chamfer(a.sets, b.sets, 16.0) + 0.7 * brute_sketch(a.sketches, b.sketches, depth)
    np.testing.assert_allclose(got, want, atol=2e-6)
    # sketch_weight 0 ignores the sketches
    np.testing.assert_allclose(similarity(a, b, alpha=16.0), brute_smooth_chamfer(a.sets, b.sets, 16.0), atol=2e-6)


def test_sketch_similarity_is_mean_row_cosine(rng):
    a, b = unit_sketch(rng, 3, 4, 5), unit_sketch(rng, 2, 4, 5)
    got = sketch_similarity(a.reshape(3, -1), b.reshape(2, -1), depth=4, chunk_size=2)
    np.testing.assert_allclose(got, brute_sketch(a, b, 4), atol=1e-6)


def test_k1_is_cosine(rng):
    a, b = unit(rng, 5, 16), unit(rng, 6, 16)  # [N, D] is K = 1
    for alpha in (1.0, 16.0, 64.0):
        np.testing.assert_allclose(smooth_chamfer(a, b, alpha=alpha), a.astype(np.float64) @ b.T, atol=2e-6)
    np.testing.assert_allclose(similarity(Embeddings(a), Embeddings(b)), a @ b.T, atol=2e-6)


def test_large_alpha_approaches_chamfer(rng):
    a, b = unit(rng, 4, 3, 8), unit(rng, 5, 4, 8)
    cos = np.einsum("ikd,jld->ijkl", a.astype(np.float64), b.astype(np.float64))
    chamfer = (cos.max(axis=3).mean(axis=2) + cos.max(axis=2).mean(axis=2)) / 2
    for alpha in (100.0, 1000.0):
        got = smooth_chamfer(a, b, alpha=alpha)
        # each direction lies in [chamfer, chamfer + log K / α]
        assert np.all(got >= chamfer - 1e-5)
        assert np.all(got <= chamfer + np.log(4) / alpha + 1e-5)
    np.testing.assert_allclose(smooth_chamfer(a, b, alpha=1e5), chamfer, atol=2e-5)


@pytest.mark.parametrize("alpha", [30.0, 64.0, 90.0, 300.0])  # the fast path's logs of 2 and 1 factors, then shifted
def test_stable_for_large_alpha_and_opposite_vectors(rng, alpha):
    a = unit(rng, 3, 4, 8)
    b = np.concatenate([-a, unit(rng, 2, 4, 8)])  # every cosine of the first rows is -1 on the diagonal blocks
    got = smooth_chamfer(a, b, alpha=alpha, chunk_size=2)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, brute_smooth_chamfer(a, b, alpha), atol=2e-6)


def test_stable_for_large_norms(rng):
    a, b = 30.0 * unit(rng, 4, 3, 8), 0.5 * unit(rng, 5, 2, 8)  # α·|x|·|y| = 240: the max-shifted path
    got = smooth_chamfer(a, b, alpha=16.0, chunk_size=(3, 2))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, brute_smooth_chamfer(a, b, 16.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [16.0, 300.0])
def test_masked_elements_change_nothing(rng, alpha):
    a, b = unit(rng, 6, 4, 8), unit(rng, 7, 3, 8)
    a_mask = rng.random((6, 4)) > 0.4
    b_mask = (rng.random((7, 3)) > 0.4).astype(np.int32)
    a_mask[0] = False  # a fully padded set
    b_mask[2] = [0, 0, 1]
    a_bad, b_bad = a.copy(), b.copy()
    a_bad[~a_mask] = np.nan
    b_bad[b_mask == 0] = 1e30
    got = smooth_chamfer(a_bad, b_bad, alpha=alpha, a_mask=a_mask, b_mask=b_mask, chunk_size=(4, 3))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, brute_smooth_chamfer(a, b, alpha, a_mask, b_mask), atol=2e-6)
    assert np.all(got[0] == 0.0)
    # the same through Embeddings
    got_e = similarity(Embeddings(a_bad, set_mask=a_mask), Embeddings(b_bad, set_mask=b_mask), alpha=alpha)
    np.testing.assert_allclose(got_e, got, atol=1e-6)
    # an all-True mask equals no mask
    np.testing.assert_array_equal(smooth_chamfer(a, b, alpha, a_mask=np.ones((6, 4))), smooth_chamfer(a, b, alpha))


@pytest.mark.parametrize("alpha", [16.0, 300.0])
def test_threads_and_cache_steps_give_the_same_result(rng, monkeypatch, alpha):
    a, b = unit(rng, 9, 4, 8), unit(rng, 11, 2, 8)
    a_mask = rng.random((9, 4)) > 0.3
    a_mask[4] = False
    want = smooth_chamfer(a, b, alpha=alpha, a_mask=a_mask, chunk_size=(5, 6))
    monkeypatch.setattr(sim_module, "_THREADS", 3)
    monkeypatch.setattr(sim_module, "_MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(sim_module, "_CACHE_COSINES", 20)  # several steps per thread
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) or overflow warnings, from any thread
        got = smooth_chamfer(a, b, alpha=alpha, a_mask=a_mask, chunk_size=(5, 6))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, brute_smooth_chamfer(a, b, alpha, a_mask=a_mask), atol=2e-6)


@pytest.mark.parametrize("alpha", [16.0, 300.0])
def test_one_worker_per_core_scores_as_the_serial_path(rng, monkeypatch, alpha):
    """Large scorings run one worker per core over its own rows of `a`, each with one BLAS thread: the same scores
    (masks, accumulate, progress up to the total), BLAS's thread count restored after, a worker's error raised."""
    from threadpoolctl import threadpool_info

    a, b = unit(rng, 23, 3, 8), unit(rng, 17, 2, 8)
    a_mask, b_mask = rng.random((23, 3)) > 0.3, rng.random((17, 2)) > 0.2
    a_mask[5] = False
    want = smooth_chamfer(a, b, alpha=alpha, a_mask=a_mask, b_mask=b_mask, chunk_size=(6, 5))
    monkeypatch.setattr(sim_module, "_THREADS", 3)
    monkeypatch.setattr(sim_module, "_PER_CORE_MIN_COSINES", 1)
    blas_threads = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    calls, workers = [], set()
    real_rows = sim_module._chamfer_rows

    def spy(*args):
        workers.add(threading.current_thread().name)
        return real_rows(*args)

    monkeypatch.setattr(sim_module, "_chamfer_rows", spy)
    out = np.ones((23, 17), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smooth_chamfer(a, b, alpha=alpha, a_mask=a_mask, b_mask=b_mask, chunk_size=(6, 5), out=out, accumulate=True,
                       progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_allclose(out, 1.0 + want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out - 1.0, brute_smooth_chamfer(a, b, alpha, a_mask, b_mask), atol=2e-6)
    assert all(name.startswith("tfemde-similarity") for name in workers) and len(workers) > 1, workers
    assert calls[-1] == (12 * 4, 12 * 4) and [d for d, _ in calls] == sorted(d for d, _ in calls)  # rows 6 // 3
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == blas_threads

    def broken(*args):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(sim_module, "_chamfer_rows", broken)
    with pytest.raises(RuntimeError, match="worker failed"):
        smooth_chamfer(a, b, alpha=alpha, chunk_size=(6, 5))
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == blas_threads


def test_overlapping_scorings_share_one_blas_limit_lifted_by_the_last():
    """Scorings running at once in several threads each enter the one-BLAS-thread limit: the first to end must not
    lift it under the other, and the last restores the count from before."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before and all(n == 2 for n in before), before  # NumPy's BLAS, on two threads
        first, second = workers.one_blas_thread(), workers.one_blas_thread()
        first.__enter__()
        second.__enter__()
        assert all(n == 1 for n in blas_threads())
        first.__exit__(None, None, None)  # the first scoring ends while the second runs
        assert all(n == 1 for n in blas_threads())
        second.__exit__(None, None, None)
        assert blas_threads() == before


def test_progress_and_out(rng):
    a, b = unit(rng, 5, 2, 4), unit(rng, 7, 2, 4)
    calls = []
    out = np.full((5, 7), 1.0, np.float32)
    smooth_chamfer(a, b, chunk_size=(2, 3), progress=lambda done, total: calls.append((done, total)), out=out,
                   accumulate=True)
    assert calls == [(i, 9) for i in range(1, 10)]
    np.testing.assert_allclose(out, 1.0 + brute_smooth_chamfer(a, b, 16.0), atol=2e-6)


def test_empty_sides(rng):
    assert smooth_chamfer(np.zeros((0, 2, 4), np.float32), unit(rng, 3, 2, 4)).shape == (0, 3)
    assert similarity(Embeddings(unit(rng, 2, 2, 4)), Embeddings(np.zeros((0, 2, 4)))).shape == (2, 0)


def test_similarity_errors(rng):
    a = Embeddings(unit(rng, 2, 2, 4))
    with pytest.raises(ValueError, match="same element dimension D"):
        similarity(a, Embeddings(unit(rng, 2, 2, 5)))
    with pytest.raises(ValueError, match="alpha must be a positive"):
        similarity(a, a, alpha=0.0)
    with pytest.raises(ValueError, match="needs sketches on both sides"):
        similarity(a, a, sketch_weight=0.5)
    s3 = Embeddings(a.sets, sketches=unit_sketch(rng, 2, 3, 4))
    s2 = Embeddings(a.sets, sketches=unit_sketch(rng, 2, 2, 6))
    with pytest.raises(ValueError, match="same size and depth"):
        similarity(s3, s2, sketch_weight=0.5)
    with pytest.raises(ValueError, match=r"a_sets must have shape \[N, K, D\]"):
        smooth_chamfer(np.zeros(4), a.sets)
    with pytest.raises(ValueError, match=r"b_mask must have shape \[N, K\] = \(2, 2\).*got shape \(2, 3\)"):
        smooth_chamfer(a.sets, a.sets, b_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="chunk_size"):
        smooth_chamfer(a.sets, a.sets, chunk_size=0)
    with pytest.raises(ValueError, match="finite"):
        smooth_chamfer(np.full((1, 1, 4), np.inf, np.float32), a.sets)
    with pytest.raises(ValueError, match="depth must be a positive divisor"):
        sketch_similarity(np.zeros((1, 6)), np.zeros((1, 6)), depth=4)


# -- Embeddings -----------------------------------------------------------------------------------------------------
def test_embeddings_shapes_selection_and_concat(rng):
    sets = unit(rng, 5, 3, 4)
    sk = unit_sketch(rng, 5, 2, 3)
    mask = rng.random((5, 3)) > 0.3
    e = Embeddings(sets.astype(np.float64), sketches=sk, set_mask=mask.astype(np.uint8))
    assert e.sets.dtype == np.float32 and e.sets.flags.c_contiguous
    assert (len(e), e.num_elements, e.dim, e.sketch_dim, e.sketch_depth) == (5, 3, 4, 6, 2)
    assert e.set_mask.dtype == bool
    np.testing.assert_array_equal(e.sketches, sk.reshape(5, 6))
    part = e.take([4, 0])
    np.testing.assert_array_equal(part.sets, sets[[4, 0]])
    np.testing.assert_array_equal(part.set_mask, mask[[4, 0]])
    np.testing.assert_array_equal(e[1:3].sketches, sk.reshape(5, 6)[1:3])
    assert len(e[-1]) == 1 and np.array_equal(e[-1].sets, sets[-1:])
    np.testing.assert_array_equal(e[np.arange(5) % 2 == 0].sets, sets[::2])
    both = Embeddings.concat([e[:2], Embeddings(sets[2:], sketches=sk[2:])])
    np.testing.assert_array_equal(both.sets, sets)
    np.testing.assert_array_equal(both.set_mask, np.concatenate([mask[:2], np.ones((3, 3), bool)]))
    assert Embeddings(sets[:, 0]).sets.shape == (5, 1, 4)
    assert np.isclose(e.max_norm, 1.0, atol=1e-6)


def test_embeddings_errors(rng):
    sets = unit(rng, 3, 2, 4)
    with pytest.raises(ValueError, match=r"sets must have shape \[N, K, D\].*got shape \(3,\)"):
        Embeddings(np.zeros(3))
    with pytest.raises(ValueError, match=r"set_mask must have shape \[N, K\] = \(3, 2\).*got shape \(3, 3\)"):
        Embeddings(sets, set_mask=np.ones((3, 3)))
    with pytest.raises(ValueError, match="sketch_depth is required"):
        Embeddings(sets, sketches=np.ones((3, 8)))
    with pytest.raises(ValueError, match="sketch_depth=3 does not match"):
        Embeddings(sets, sketches=np.ones((3, 2, 4)), sketch_depth=3)
    with pytest.raises(ValueError, match="positive divisor"):
        Embeddings(sets, sketches=np.ones((3, 8)), sketch_depth=3)
    with pytest.raises(ValueError, match=r"sketches must have N = 3 rows"):
        Embeddings(sets, sketches=np.ones((2, 2, 4)))
    bad = sets.copy()
    bad[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="item 1 element 0 is not"):
        Embeddings(bad)
    Embeddings(bad, set_mask=[[1, 1], [0, 1], [1, 1]])  # a padded NaN is fine
    with pytest.raises(ValueError, match=r"share \[K, D\]"):
        Embeddings.concat([Embeddings(sets), Embeddings(unit(rng, 1, 3, 4))])
    with pytest.raises(ValueError, match="at least one"):
        Embeddings.concat([])
    with pytest.raises(ValueError, match="1-D int array"):
        Embeddings(sets).take([[0]])


# -- the serving boundary -------------------------------------------------------------------------------------------
def test_serving_imports_without_tensorflow_or_keras():
    code = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None
        sys.modules["keras"] = None
        import numpy as np
        import tfemde
        import tfemde.serving
        import tfemde.evaluation
        from tfemde.serving import Embeddings, SetIndex, similarity
        e = Embeddings(np.eye(3, 4, dtype="float32"))
        s = similarity(e, e)
        index = SetIndex()
        index.add(e)
        ids, _ = index.search(e, k=1)
        assert ids[:, 0].tolist() == [0, 1, 2], ids
        assert tfemde.evaluation.retrieval_metrics(s, [0, 1, 2])["rsum"] == 600.0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
        assert all(sys.modules[m] is None for m in loaded), loaded
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
