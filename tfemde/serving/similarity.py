"""Smooth-Chamfer set similarity and T-EMDE sketch similarity in NumPy: the one implementation used by
evaluation and serving (ALGORITHMS.md §3.3, §5.3, §9.13).

For sets X (K_x elements) and Y (K_y elements) with element cosines c(x, y) = <x, y>:

    s_SC(X, Y) = 1/(2α|X|) Σ_{x∈X} log Σ_{y∈Y} exp(α c(x, y)) + 1/(2α|Y|) Σ_{y∈Y} log Σ_{x∈X} exp(α c(x, y))

and the full score is `s_SC + sketch_weight · s_sk`, with `s_sk = (1/depth) <Ŝ_x, Ŝ_y>` the mean over the `depth`
partitionings of the row cosines of two sketches (their rows are L2-normalised, so it is the flattened dot / depth).

How it is computed: the items are cut into chunks on both sides (2048 x 4096 set elements by default, 32 MiB of
cosines). The `a` chunk is copied element-major (row k·n_items + n) with α folded in; `b` is read in place, one
strided view per element index. So K_b float32 matrix multiplies fill all α·c of the chunk, `[K_a·a, K_b·b]`, and
the K_a × K_b blocks are reduced with whole-array adds over a `[K_a, a, K_b, b]` view (no loop over items), in
cache-sized pieces. A large scoring (from two chunks' worth of cosines) runs one worker thread per core, each with
one BLAS thread, scoring its own rows of `a` against all of `b` in chunks a fraction as tall, from product to
scores: 1.15-1.17x faster than BLAS on every core followed by the element-wise part (exp, block sums, logs) in a
thread per core, whose cores BLAS's spin-waiting threads took (2,000 x 10,000 sets of 4 x 1,024, side by side,
2-core Xeon, 2026-12-07). A small one (a query batch against a gallery block) keeps BLAS on every core. Memory
stays at the result plus a few chunk buffers.

Numerical safety: with B = α·max‖x‖·max‖y‖ (Cauchy-Schwarz), every α·c lies in [-B, B]. When
B + log K ≤ 85 (unit elements, α up to about 80) exp(α·c) and its block sums are normal float32 numbers, so
LogSumExp needs no shift at all and exp, sum, log is exact (the fast path: one exp per cosine). The Σ log over a
set is taken as the log of a product of as many factors as stay inside float32's range, which saves most of the
logs. Otherwise (larger α or norms) each LogSumExp is shifted by its own maximum, the textbook stable form (two
exps per cosine). Logits of padded elements are overwritten with -(2B + 300), so their exp is exactly 0 and they
never hold a maximum, whatever the padded elements held; a set with no valid element scores 0 against everything.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Callable, Optional, Tuple, Union

import numpy as np

from tfemde.serving import workers
from tfemde.serving.embeddings import Embeddings, max_element_norm as _max_norm

# |log| of every intermediate kept below this: float32 is normal between exp(-87.3) and exp(88.7).
_LOG_RANGE = 85.0
# Default chunk, in set elements per side: the [rows, cols] float32 cosine buffer is 2048 x 4096 = 32 MiB and
# the matrix multiply runs near the BLAS peak at that size (see benchmarks/scoring.py).
_CHUNK_ROW_ELEMENTS = 2048
_CHUNK_COL_ELEMENTS = 4096

# Threads for the element-wise part of a chunk, and the least cosines worth a thread.
_THREADS = max(1, min(os.cpu_count() or 1, 8))
_MIN_WORK_PER_THREAD = 1 << 18
# Cosines finished per step of a thread: 1 MiB of float32, plus the two partial sums (a quarter each), stays in a
# core's 2 MiB L2 cache (2 MiB pieces were 1.5-2 % slower scoring 2,000 x 10,000 sets of 4 x 1,024, sketched).
_CACHE_COSINES = 1 << 18
# From this many cosines a scoring runs one worker per core, each with one BLAS thread, over its own rows of `a`
# (two default chunks: a small scoring, one query against a gallery block, keeps BLAS on every core instead).
_PER_CORE_MIN_COSINES = 2 * _CHUNK_ROW_ELEMENTS * _CHUNK_COL_ELEMENTS

ChunkSize = Union[None, int, Tuple[int, int]]

def _check_sets(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [N, K, D] (or [N, D]); got shape {np.shape(x)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one element per set (K >= 1); got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_set_mask(mask, sets: np.ndarray, name: str, sets_name: str) -> Optional[np.ndarray]:
    """A `[N, K]` bool mask, or None when there is no mask or it is all True."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != sets.shape[:2]:
        raise ValueError(f"{name} must have shape [N, K] = {sets.shape[:2]} to match {sets_name}; "
                         f"got shape {mask.shape}")
    mask = mask.astype(bool) if mask.dtype != bool else mask
    return None if mask.all() else mask


def check_alpha(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a positive finite number; got {alpha!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"alpha must be a positive finite number; got {alpha!r}")
    return value


def chunk_shape(chunk_size: ChunkSize, k_a: int, k_b: int) -> Tuple[int, int]:
    if chunk_size is None:
        return max(1, _CHUNK_ROW_ELEMENTS // k_a), max(1, _CHUNK_COL_ELEMENTS // k_b)
    if isinstance(chunk_size, (int, np.integer)):
        rows = cols = int(chunk_size)
    else:
        try:
            rows, cols = (int(c) for c in chunk_size)
        except (TypeError, ValueError):
            raise ValueError(f"chunk_size must be None, an int or a pair (rows, cols) of ints; got {chunk_size!r}")
    if rows < 1 or cols < 1:
        raise ValueError(f"chunk_size must be positive item counts; got {chunk_size!r}")
    return rows, cols


def _element_major(sets: np.ndarray, scale: float) -> np.ndarray:
    """`[n, K, D]` -> `[K·n, D]` float32 copy times `scale`: element k of item i at row k·n + i."""
    n, k, d = sets.shape
    out = np.empty((k, n, d), dtype=np.float32)
    np.multiply(sets.transpose(1, 0, 2), np.float32(scale), out=out)
    return out.reshape(k * n, d)


def _sum_logs(values: np.ndarray, axis: int, group: int, out: np.ndarray) -> np.ndarray:
    """`out = Σ_k log(values[k])` over `axis`, multiplying `group` factors before each log (fewer logs)."""
    count = values.shape[axis]
    if group >= count:  # the usual case (unit elements, α up to ~20 for K = 4): one product, one log
        np.multiply.reduce(values, axis=axis, out=out)
        return np.log(out, out=out)
    out[...] = 0.0
    prod = np.empty_like(out)
    for start in range(0, count, group):
        np.multiply.reduce(values.take(range(start, min(start + group, count)), axis=axis), axis=axis, out=prod)
        np.log(prod, out=prod)
        out += prod
    return out


def _chamfer_rows(e, fast, group_row, group_col, a_pad, b_pad, a_weight, b_weight, a_empty, b_empty):
    """Finish the Smooth-Chamfer scores of a group of items of one chunk from their α·cosines.

    Args:
        e: `[K_a, n_a, K_b, n_b]` float32 view of α·c(x_k of item i, y_l of item j); overwritten.
        fast: exp without shift (all α·c in range, see the module docstring); else max-shifted LogSumExp.
        group_row, group_col: factors multiplied per log in the fast path.
        a_pad, b_pad: `[K_a, n_a]`, `[K_b, n_b]` bool, True at padded elements, or None.
        a_weight, b_weight: `[n_a]`, `[n_b]` float32 1/(2α|X|), 1/(2α|Y|).
        a_empty, b_empty: `[n_a]`, `[n_b]` bool, sets without a valid element (score 0), or None.

    Returns:
        `[n_a, n_b]` float32 scores.
    """
    k_a, n_a, k_b, n_b = e.shape
    if fast:
        np.exp(e, out=e)  # in range by construction: no shift needed
        row = np.add.reduce(e, axis=2)  # [K_a, n_a, n_b]: Σ_y exp(α c(x, y)) for each x
        col = np.add.reduce(e, axis=0)  # [n_a, K_b, n_b]: Σ_x exp(α c(x, y)) for each y
        if a_pad is not None:
            row[a_pad] = 1.0  # log 1 = 0: padded x add nothing
        if b_pad is not None:
            col[:, b_pad] = 1.0
        row_sum = _sum_logs(row, 0, group_row, np.empty((n_a, n_b), np.float32))
        col_sum = _sum_logs(col, 1, group_col, np.empty((n_a, n_b), np.float32))
    else:  # stable path: shift each LogSumExp by its own maximum
        sums = []
        for axis, pad in ((2, a_pad), (0, b_pad)):
            m = e.max(axis=axis, keepdims=True)
            t = np.subtract(e, m)
            np.exp(t, out=t)
            lse = np.add.reduce(t, axis=axis)
            np.log(lse, out=lse)
            lse += np.squeeze(m, axis=axis)
            if axis == 2:  # lse [K_a, n_a, n_b]
                if pad is not None:
                    lse[pad] = 0.0
                sums.append(np.add.reduce(lse, axis=0))
            else:  # lse [n_a, K_b, n_b]
                if pad is not None:
                    lse[:, pad] = 0.0
                sums.append(np.add.reduce(lse, axis=1))
        row_sum, col_sum = sums
    row_sum *= a_weight[:, None]
    col_sum *= b_weight[None, :]
    row_sum += col_sum
    if a_empty is not None:
        row_sum[a_empty] = 0.0
        row_sum[:, b_empty] = 0.0
    return row_sum


def smooth_chamfer(
    a_sets,
    b_sets,
    alpha: float = 16.0,
    a_mask=None,
    b_mask=None,
    chunk_size: ChunkSize = None,
    progress: Optional[Callable[[int, int], None]] = None,
    out: Optional[np.ndarray] = None,
    accumulate: bool = False,
) -> np.ndarray:
    """Smooth-Chamfer similarity between every set of `a_sets` and every set of `b_sets` (ALGORITHMS.md §3.3).

    The average of the two soft-Chamfer directions, each a mean over one set of a LogSumExp over the other,
    scaled by 1/α. With K = 1 on both sides it is the cosine; as α → ∞ it tends to the Chamfer similarity.

    Args:
        a_sets: `[N_a, K_a, D]` (or `[N_a, D]`) set elements, normally L2-normalised.
        b_sets: `[N_b, K_b, D]` (or `[N_b, D]`); K_b may differ from K_a.
        alpha: the temperature α > 0 (DivE trains and evaluates with 16).
        a_mask: `[N_a, K_a]` bool or 0/1, False at padded elements, or None (all valid).
        b_mask: `[N_b, K_b]`, likewise.
        chunk_size: items per chunk: an int for both sides, a pair `(rows, cols)`, or None for about 2048 × 4096
            set elements (32 MiB of cosines). Results do not depend on it.
        progress: called as `progress(done, total)` after every chunk.
        out: an optional `[N_a, N_b]` float32 C-contiguous array to write into.
        accumulate: add to `out` instead of overwriting it.

    Returns:
        `[N_a, N_b]` float32 similarities. A pair where either set has no valid element scores 0.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import smooth_chamfer
        >>> x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
        >>> x /= np.linalg.norm(x, axis=-1, keepdims=True)
        >>> s = smooth_chamfer(x, x, alpha=16.0)
        >>> s.shape, bool(s[0, 0] > s[0, 1])
        ((2, 2), True)
    """
    a = _check_sets(a_sets, "a_sets")
    b = _check_sets(b_sets, "b_sets")
    if a.shape[2] != b.shape[2]:
        raise ValueError(f"a_sets and b_sets must have the same element dimension D; got shapes {a.shape} and "
                         f"{b.shape}")
    alpha = check_alpha(alpha)
    a_mask = check_set_mask(a_mask, a, "a_mask", "a_sets")
    b_mask = check_set_mask(b_mask, b, "b_mask", "b_sets")
    (n_a, k_a, d), (n_b, k_b, _) = a.shape, b.shape
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an out array")
        out = np.empty((n_a, n_b), dtype=np.float32)
    elif out.shape != (n_a, n_b) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape [N_a, N_b] = {(n_a, n_b)}; got "
                         f"shape {out.shape} dtype {out.dtype}")
    return smooth_chamfer_checked(a, b, alpha, a_mask, b_mask, None, None, chunk_size, progress, out, accumulate)


def _logit_range(bound: float, k_a: int, k_b: int) -> Tuple[bool, int, int, np.float32]:
    """`(fast, group_row, group_col, big)` for logits α·c within [-bound, bound] (see the module docstring)."""
    fast = bound + math.log(max(k_a, k_b)) <= _LOG_RANGE
    # Factors per log: a block sum lies in [exp(-B), K·exp(B)], so `g` of them multiply inside float32's range.
    group_row = max(1, int(_LOG_RANGE // (bound + math.log(k_b)))) if bound + math.log(k_b) > 0 else k_a
    group_col = max(1, int(_LOG_RANGE // (bound + math.log(k_a)))) if bound + math.log(k_a) > 0 else k_b
    # Padded elements: their logits are overwritten with -big after the matrix multiply, so exp gives exactly 0
    # and they never hold a maximum (whatever values, even NaN, the padded elements held).
    return fast, group_row, group_col, np.float32(2.0 * bound + 300.0)


def _set_weights(mask: Optional[np.ndarray], n: int, k: int, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
    """`([n] float32 1/(2α|X|), [n] bool True for a set without a valid element)`."""
    count = np.full(n, k, np.int64) if mask is None else mask.sum(axis=1)
    return (0.5 / alpha / np.maximum(count, 1)).astype(np.float32), count == 0


def smooth_chamfer_of_logits(logits: np.ndarray, alpha: float, a_mask: Optional[np.ndarray],
                             b_mask: Optional[np.ndarray], bound: float) -> np.ndarray:
    """Smooth-Chamfer scores from the logits of every element pair, computed elsewhere (e.g. by FAISS).

    Args:
        logits: `[K_a, n_a, K_b, n_b]` float32 α·c(x_k of a-set i, y_l of b-set j); overwritten.
        alpha: the temperature α the logits were scaled by.
        a_mask, b_mask: `[n_a, K_a]`, `[n_b, K_b]` bool, False at padded elements, or None.
        bound: a bound of |logit| over the valid pairs (α·max‖x‖·max‖y‖).

    Returns:
        `[n_a, n_b]` float32, as `smooth_chamfer` gives for the sets these logits came from.
    """
    k_a, n_a, k_b, n_b = logits.shape
    fast, group_row, group_col, big = _logit_range(bound, k_a, k_b)
    a_weight, a_empty = _set_weights(a_mask, n_a, k_a, alpha)
    b_weight, b_empty = _set_weights(b_mask, n_b, k_b, alpha)
    a_pad = None if a_mask is None else ~a_mask.T
    b_pad = None if b_mask is None else ~b_mask.T
    if a_pad is not None:
        logits[a_pad] = -big
    if b_pad is not None:
        logits[:, :, b_pad] = -big
    masked = a_mask is not None or b_mask is not None
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        return _chamfer_rows(logits, fast, group_row, group_col, a_pad, b_pad, a_weight, b_weight,
                             a_empty if masked else None, b_empty if masked else None)


def smooth_chamfer_checked(a, b, alpha, a_mask, b_mask, a_norm, b_norm, chunk_size, progress, out, accumulate):
    """`smooth_chamfer` on checked arrays; `a_norm`/`b_norm` are the max valid element norms (None: compute)."""
    (n_a, k_a, d), (n_b, k_b, _) = a.shape, b.shape
    if n_a == 0 or n_b == 0:
        return out
    rows, cols = chunk_shape(chunk_size, k_a, k_b)

    a_norm = _max_norm(a, a_mask, "a_sets") if a_norm is None else a_norm
    b_norm = _max_norm(b, b_mask, "b_sets") if b_norm is None else b_norm
    fast, group_row, group_col, big = _logit_range(alpha * a_norm * b_norm, k_a, k_b)
    a_weight, a_empty = _set_weights(a_mask, n_a, k_a, alpha)
    b_weight, b_empty = _set_weights(b_mask, n_b, k_b, alpha)
    masked = a_mask is not None or b_mask is not None

    worker_rows = max(1, rows // _THREADS)
    per_core = (_THREADS > 1 and -(-n_a // worker_rows) >= _THREADS
                and n_a * k_a * n_b * k_b >= _PER_CORE_MIN_COSINES)
    if per_core:  # each worker scores its own rows of `a` against all of `b`, in chunks a fraction as tall
        rows = worker_rows
    a_ranges = [(i, min(i + rows, n_a)) for i in range(0, n_a, rows)]
    b_ranges = [(j, min(j + cols, n_b)) for j in range(0, n_b, cols)]
    buffer_size = (a_ranges[0][1] * k_a) * (b_ranges[0][1] * k_b)

    def score(i0, i1, a_elems, j0, j1, buf, rows_in_threads):
        na, nb = i1 - i0, j1 - j0
        c = buf[: na * k_a * nb * k_b].reshape(na * k_a, nb * k_b)
        for l in range(k_b):  # b's element l of every item is a strided view: BLAS reads it without a copy
            np.matmul(a_elems, b[j0:j1, l, :].T, out=c[:, l * nb:(l + 1) * nb])
        if a_mask is not None:
            c[np.flatnonzero(~a_mask[i0:i1].T)] = -big
        if b_mask is not None:
            c[:, np.flatnonzero(~b_mask[j0:j1].T)] = -big
        e = c.reshape(k_a, na, k_b, nb)
        a_pad = None if a_mask is None else ~a_mask[i0:i1].T
        b_pad = None if b_mask is None else ~b_mask[j0:j1].T

        def rows_part(r0, r1):
            # In pieces of about 1 MiB of cosines, so that exp and both reductions run in the core's cache.
            step = max(1, _CACHE_COSINES // (k_a * k_b * nb))
            with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):  # per thread
                for s0 in range(r0, r1, step):
                    s1 = min(s0 + step, r1)
                    part = _chamfer_rows(
                        e[:, s0:s1], fast, group_row, group_col, None if a_pad is None else a_pad[:, s0:s1], b_pad,
                        a_weight[i0 + s0:i0 + s1], b_weight[j0:j1],
                        a_empty[i0 + s0:i0 + s1] if masked else None, b_empty[j0:j1] if masked else None)
                    if accumulate:
                        out[i0 + s0:i0 + s1, j0:j1] += part
                    else:
                        out[i0 + s0:i0 + s1, j0:j1] = part

        # NumPy's element-wise functions use one core and release the GIL: a chunk's row ranges run on every core.
        parts = min(_THREADS, na, max(1, c.size // _MIN_WORK_PER_THREAD)) if rows_in_threads else 1
        workers.run_in_parts(rows_part, na, parts, _THREADS)

    def score_rows(i0, i1, rows_in_threads, after_each_chunk=None):
        buf = np.empty(buffer_size, dtype=np.float32)
        a_elems = _element_major(a[i0:i1], alpha)  # α folded into the (copied) query side
        for j0, j1 in b_ranges:
            score(i0, i1, a_elems, j0, j1, buf, rows_in_threads)
            if after_each_chunk is not None:
                after_each_chunk()

    total, done = len(a_ranges) * len(b_ranges), 0

    def count_chunks(chunks=1):
        nonlocal done
        done += chunks
        if progress is not None:
            progress(done, total)

    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        if per_core:
            with workers.one_blas_thread():
                futures = [workers.thread_pool(_THREADS).submit(score_rows, i0, i1, False) for i0, i1 in a_ranges]
                try:
                    for future in futures:
                        future.result()
                        count_chunks(len(b_ranges))
                except BaseException:
                    for future in futures:
                        future.cancel()
                    concurrent.futures.wait(futures)  # no worker writes into `out` after this returns
                    raise
        else:
            for i0, i1 in a_ranges:
                score_rows(i0, i1, True, count_chunks)
    return out


def sketch_similarity(a_sketches, b_sketches, depth: int, chunk_size: Optional[int] = None,
                      weight: float = 1.0, out: Optional[np.ndarray] = None, accumulate: bool = False) -> np.ndarray:
    """T-EMDE sketch similarity: the mean over `depth` partitionings of the row cosines (ALGORITHMS.md §5.3).

    With L2-normalised rows this is `<a, b> / depth` of the flattened sketches.

    Args:
        a_sketches: `[N_a, S]` flattened sketches, `S = depth·W`, rows L2-normalised per partitioning.
        b_sketches: `[N_b, S]`.
        depth: the number of partitionings (rows) in each sketch.
        chunk_size: rows of `a_sketches` per matrix multiply (bounds the temporary memory); None for 4096.
        weight: a factor folded into the product (`similarity` passes `sketch_weight`).
        out: an optional `[N_a, N_b]` float32 C-contiguous array to write (or, with `accumulate`, add) into.

    Returns:
        `[N_a, N_b]` float32 `weight · <a, b> / depth`.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import sketch_similarity
        >>> s = np.full((1, 2, 4), 0.5, dtype="float32")  # depth 2, W = 4, unit rows
        >>> sketch_similarity(s.reshape(1, 8), s.reshape(1, 8), depth=2)
        array([[1.]], dtype=float32)
    """
    a = np.asarray(a_sketches)
    b = np.asarray(b_sketches)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a_sketches and b_sketches must have shapes [N_a, S] and [N_b, S] with the same S; got "
                         f"{a.shape} and {b.shape}")
    depth = int(depth)
    if depth < 1 or a.shape[1] % depth:
        raise ValueError(f"depth must be a positive divisor of the sketch size {a.shape[1]}; got {depth}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if out is None:
        out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
        accumulate = False
    elif out.shape != (a.shape[0], b.shape[0]) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(a.shape[0], b.shape[0])}; got "
                         f"shape {out.shape} dtype {out.dtype}")
    rows = 4096 if chunk_size is None else max(1, int(chunk_size))
    scale = np.float32(weight / depth)
    tmp = None
    for i0 in range(0, a.shape[0], rows):
        i1 = min(i0 + rows, a.shape[0])
        a_scaled = a[i0:i1] * scale
        if accumulate:
            tmp = np.matmul(a_scaled, b.T, out=None if tmp is None or tmp.shape[0] != i1 - i0 else tmp)
            out[i0:i1] += tmp
        else:
            np.matmul(a_scaled, b.T, out=out[i0:i1])
    return out


def similarity(
    a: Embeddings,
    b: Embeddings,
    alpha: float = 16.0,
    sketch_weight: float = 0.0,
    chunk_size: ChunkSize = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> np.ndarray:
    """The tfemde score between every item of `a` and every item of `b`: Smooth-Chamfer + λ·sketch cosine.

    `s(x, y) = s_SC(X, Y) + sketch_weight · <Ŝ_x, Ŝ_y> / depth`, the same similarity the model trains with.

    Args:
        a: `Embeddings` of N_a items (e.g. queries).
        b: `Embeddings` of N_b items (e.g. the gallery); same D, and the same sketch size and depth when
            `sketch_weight != 0`. K may differ.
        alpha: Smooth-Chamfer temperature α.
        sketch_weight: λ, the weight of the sketch similarity; 0 ignores sketches.
        chunk_size: items per chunk, see `smooth_chamfer`.
        progress: called as `progress(done, total)` after every chunk of the set similarity.

    Returns:
        `[N_a, N_b]` float32 scores.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import Embeddings, similarity
        >>> x = np.random.default_rng(0).normal(size=(2, 4, 8)).astype("float32")
        >>> e = Embeddings(x / np.linalg.norm(x, axis=-1, keepdims=True))
        >>> similarity(e, e).shape
        (2, 2)
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Embeddings):
            raise ValueError(f"{name} must be tfemde.serving.Embeddings; got {type(value).__name__}")
    if a.dim != b.dim:
        raise ValueError(f"a and b must have the same element dimension D; got sets of shapes {a.sets.shape} and "
                         f"{b.sets.shape}")
    sketch_weight = float(sketch_weight)
    out = np.empty((len(a), len(b)), dtype=np.float32)
    accumulate = False
    if sketch_weight != 0.0:
        if a.sketches is None or b.sketches is None:
            raise ValueError(f"sketch_weight={sketch_weight} needs sketches on both sides; a has "
                             f"{'no' if a.sketches is None else 'a'} sketch, b has "
                             f"{'no' if b.sketches is None else 'a'} sketch")
        if (a.sketch_dim, a.sketch_depth) != (b.sketch_dim, b.sketch_depth):
            raise ValueError(f"a and b sketches must have the same size and depth; got (S, depth) = "
                             f"{(a.sketch_dim, a.sketch_depth)} and {(b.sketch_dim, b.sketch_depth)}")
        sketch_similarity(a.sketches, b.sketches, a.sketch_depth, weight=sketch_weight, out=out)
        accumulate = True
    alpha = check_alpha(alpha)
    a_mask = check_set_mask(a.set_mask, a.sets, "a.set_mask", "a.sets")
    b_mask = check_set_mask(b.set_mask, b.sets, "b.set_mask", "b.sets")
    return smooth_chamfer_checked(a.sets, b.sets, alpha, a_mask, b_mask, a.max_norm, b.max_norm, chunk_size, progress,
                           out, accumulate)
