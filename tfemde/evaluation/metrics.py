"""Retrieval metrics from scores: recall@K, RSUM, median and mean rank, the full and COCO 1K (five-fold) protocols.

ALGORITHMS.md §0. Image→text (i2t): every item with at least one caption of its own is a query, and its rank is
the best rank among its matching captions. Text→image (t2i): every caption is a query, and its rank is the rank of
its item. Ranks are 0-based and ties count against the model: a non-matching candidate with a score equal to the
best match's ranks ahead of it. With `groups`, everything in the query's group matches (skin-tone variants of one
emoji, repeated images); groups change what matches, never which items are queries.

R@K is the percentage of queries with rank < K; medr = floor(median rank) + 1; meanr = mean rank + 1;
RSUM = the six recalls summed (600 at best).

This module imports only NumPy (tqdm for the optional progress bar). The protocol helpers take embeddings and
score them in chunks with `tfemde.serving.similarity`, the same similarity serving uses, so evaluating a model
only needs its embeddings (`tfemde.evaluation.encode`). `concept_ranks` scores concept queries (a concept's name
against the whole gallery).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from tfemde.serving import Embeddings, similarity as set_similarity

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
               "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")
RECALL_AT = (1, 5, 10)
# Scores compared per ranking step (rows x candidates), about 64 MiB of float32.
_RANK_BLOCK = 1 << 24
# Matching (item, caption) pairs are listed when there are at most this many per query (else dense masks).
_MAX_PAIRS_PER_QUERY = 64

def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the training install; without it, no bar
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _check_inputs(similarity, caption_item, groups) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    sim = np.asarray(similarity)
    if sim.ndim != 2:
        raise ValueError(f"similarity must have shape [N_items, N_captions]; got shape {sim.shape}")
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float32)
    n_items, n_captions = sim.shape
    if n_items == 0 or n_captions == 0:
        raise ValueError(f"similarity needs at least one item and one caption; got shape {sim.shape}")
    cap = np.asarray(caption_item)
    if cap.shape != (n_captions,):
        raise ValueError(f"caption_item must have shape [N_captions] = ({n_captions},) to match similarity "
                         f"[N_items, N_captions] = {sim.shape}; got shape {cap.shape}")
    if not np.issubdtype(cap.dtype, np.integer):
        raise ValueError(f"caption_item must hold int item indices; got dtype {cap.dtype}")
    if cap.min() < 0 or cap.max() >= n_items:
        raise ValueError(f"caption_item must index items 0..{n_items - 1}; got values in [{cap.min()}, {cap.max()}]")
    if groups is None:
        grp = np.arange(n_items)
    else:
        grp = np.asarray(groups)
        if grp.shape != (n_items,):
            raise ValueError(f"groups must have shape [N_items] = ({n_items},) to match similarity; got shape "
                             f"{grp.shape}")
        grp = np.unique(grp, return_inverse=True)[1].reshape(-1)  # any hashable labels -> 0..G-1
    if not np.isfinite(sim).all():
        raise ValueError("similarity must be finite (NaN or inf found)")
    return sim, cap.astype(np.int64), grp.astype(np.int64)


def _count_ahead(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """`[R]` 0-based rank of the best positive per row: non-positives scoring >= it (ties against the model)."""
    best = np.where(positive, scores, -np.inf).max(axis=1)
    ahead = scores >= best[:, None]
    ahead &= ~positive
    return np.count_nonzero(ahead, axis=1)


def _positive_pairs(item_group: np.ndarray, caption_group: np.ndarray, limit: int):
    """`(items [P], captions [P])`: every (item, caption) pair of the same group, or None if P > limit."""
    items_per_group = np.bincount(item_group, minlength=int(caption_group.max()) + 1)
    reps = items_per_group[caption_group]  # items matching each caption
    total = int(reps.sum())
    if total > limit:
        return None
    by_group = np.argsort(item_group, kind="stable")
    first = np.cumsum(items_per_group) - items_per_group  # where each group starts in `by_group`
    pair_caption = np.repeat(np.arange(len(caption_group)), reps)
    within = np.arange(total) - np.repeat(np.cumsum(reps) - reps, reps)
    pair_item = by_group[np.repeat(first[caption_group], reps) + within]
    return pair_item, pair_caption


def retrieval_ranks(similarity, caption_item, groups=None, progress: bool = False,
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """0-based ranks of every i2t and t2i query (ties against the model, group-aware).

    A rank is the number of non-matching candidates that score at least as high as the query's best match.

    Args:
        similarity: `[N_items, N_captions]` scores, higher is better.
        caption_item: `[N_captions]` int, the item of every caption.
        groups: `[N_items]` group labels, or None (every item its own group).
        progress: show a tqdm progress bar.

    Returns:
        `(i2t_ranks [Q], t2i_ranks [N_captions], i2t_items [Q])`: `i2t_items` are the query items, those with
        at least one caption of their own, in increasing order.
    """
    sim, cap, grp = _check_inputs(similarity, caption_item, groups)
    n_items, n_captions = sim.shape
    queries = np.flatnonzero(np.bincount(cap, minlength=n_items) > 0)
    caption_group = grp[cap]
    rows = max(1, _RANK_BLOCK // n_captions)
    pairs = _positive_pairs(grp, caption_group, limit=_MAX_PAIRS_PER_QUERY * (n_items + n_captions))
    if pairs is None:  # huge groups: dense match masks, block by block
        return _dense_ranks(sim, grp, caption_group, queries, progress) + (queries,)

    # Best match of every query from the matching pairs, then one comparison pass over the matrix per direction:
    # rank = #(candidates >= best) - #(matches >= best).
    pair_item, pair_caption = pairs
    pair_score = sim[pair_item, pair_caption]
    best_item = np.full(n_items, -np.inf, sim.dtype)
    np.maximum.at(best_item, pair_item, pair_score)
    best_caption = np.full(n_captions, -np.inf, sim.dtype)
    np.maximum.at(best_caption, pair_caption, pair_score)
    tied_item = np.bincount(pair_item[pair_score >= best_item[pair_item]], minlength=n_items)
    tied_caption = np.bincount(pair_caption[pair_score >= best_caption[pair_caption]], minlength=n_captions)

    bar = _progress_bar(progress, 2 * -(-n_items // rows), "ranking")
    ahead_item = np.zeros(n_items, np.int64)
    ahead_caption = np.zeros(n_captions, np.int64)
    for r0 in range(0, n_items, rows):
        block = sim[r0:r0 + rows]
        ahead_item[r0:r0 + rows] = np.count_nonzero(block >= best_item[r0:r0 + rows, None], axis=1)
        if bar is not None:
            bar.update(1)
        ahead_caption += np.count_nonzero(block >= best_caption[None, :], axis=0)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return (ahead_item - tied_item)[queries], ahead_caption - tied_caption, queries


def _dense_ranks(sim, grp, caption_group, queries, progress):
    n_items, n_captions = sim.shape
    rows = max(1, _RANK_BLOCK // n_captions)
    cols = max(1, _RANK_BLOCK // n_items)
    bar = _progress_bar(progress, -(-len(queries) // rows) + -(-n_captions // cols), "ranking")
    i2t = np.empty(len(queries), np.int64)
    for r0 in range(0, len(queries), rows):
        items = queries[r0:r0 + rows]
        i2t[r0:r0 + rows] = _count_ahead(sim[items], caption_group[None, :] == grp[items, None])
        if bar is not None:
            bar.update(1)
    t2i = np.empty(n_captions, np.int64)
    for c0 in range(0, n_captions, cols):
        scores = np.ascontiguousarray(sim[:, c0:c0 + cols].T)
        t2i[c0:c0 + cols] = _count_ahead(scores, grp[None, :] == caption_group[c0:c0 + cols, None])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return i2t, t2i


def metrics_from_ranks(i2t_ranks, t2i_ranks) -> Dict[str, float]:
    """The metric dict (keys `METRIC_KEYS`) from 0-based i2t and t2i ranks."""
    out = {}
    for name, ranks in (("i2t", np.asarray(i2t_ranks)), ("t2i", np.asarray(t2i_ranks))):
        if ranks.size == 0:
            raise ValueError(f"{name}_ranks is empty: there are no {name} queries")
        for k in RECALL_AT:
            out[f"{name}_r{k}"] = float(100.0 * np.mean(ranks < k))
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(np.mean(ranks) + 1)
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_AT))
    return {key: out[key] for key in METRIC_KEYS}


def retrieval_metrics(similarity, caption_item, groups=None, progress: bool = False) -> Dict[str, float]:
    """Image↔text retrieval metrics from a score matrix (ALGORITHMS.md §0).

    Items without a caption of their own are not i2t queries (they still count as candidates for t2i and, with
    groups, as matches of their group's captions' queries).

    Args:
        similarity: `[N_items, N_captions]` scores, higher is better (finite).
        caption_item: `[N_captions]` int, the item index of every caption.
        groups: `[N_items]` group labels (ints or strings), or None. With groups, for i2t any caption of an item
            in the query's group matches, and for t2i any item in the caption's item's group matches.
        progress: show a tqdm progress bar.

    Returns:
        dict with `i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10` (percent), `rsum`, `i2t_medr t2i_medr`
        (floor(median 0-based rank) + 1) and `i2t_meanr t2i_meanr` (mean 0-based rank + 1), as floats.

    Example:
        >>> import numpy as np
        >>> from tfemde.evaluation import retrieval_metrics
        >>> sim = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7]])  # 2 items, 3 captions
        >>> m = retrieval_metrics(sim, caption_item=[0, 0, 1])
        >>> m["i2t_r1"], m["t2i_r1"], m["rsum"]
        (100.0, 100.0, 600.0)
    """
    i2t, t2i, _ = retrieval_ranks(similarity, caption_item, groups, progress=progress)
    return metrics_from_ranks(i2t, t2i)


def _check_embeddings(images, captions, caption_item) -> np.ndarray:
    for name, value in (("images", images), ("captions", captions)):
        if not isinstance(value, Embeddings):
            raise ValueError(f"{name} must be tfemde.serving.Embeddings; got {type(value).__name__}")
    cap = np.asarray(caption_item)
    if cap.shape != (len(captions),):
        raise ValueError(f"caption_item must have shape [N_captions] = ({len(captions)},) to match captions; got "
                         f"shape {cap.shape}")
    return cap


def _score(images, captions, alpha, sketch_weight, chunk_size, progress, desc):
    bar = None

    def update(done, total):
        nonlocal bar
        if bar is None:
            bar = _progress_bar(True, total, desc)
        if bar is not None:
            bar.update(1)

    try:
        return set_similarity(images, captions, alpha=alpha, sketch_weight=sketch_weight, chunk_size=chunk_size,
                              progress=update if progress else None)
    finally:
        if bar is not None:
            bar.close()


def full(images: Embeddings, captions: Embeddings, caption_item, groups=None, alpha: float = 16.0,
         sketch_weight: float = 0.0, chunk_size=None, progress: bool = False) -> Dict[str, float]:
    """All items against all captions (COCO 5K, Flickr30K 1K, any split).

    Args:
        images: `Embeddings` of N_items items (deduplicated: one row per image).
        captions: `Embeddings` of N_captions captions.
        caption_item: `[N_captions]` int, the item of every caption.
        groups: `[N_items]` group labels, or None.
        alpha: Smooth-Chamfer temperature α.
        sketch_weight: weight λ of the sketch similarity (0 ignores sketches).
        chunk_size: similarity chunking, see `tfemde.serving.smooth_chamfer`.
        progress: show tqdm progress bars.

    Returns:
        the `retrieval_metrics` dict.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import Embeddings
        >>> from tfemde.evaluation import full
        >>> x = np.random.default_rng(0).normal(size=(4, 2, 8)).astype("float32")
        >>> x /= np.linalg.norm(x, axis=-1, keepdims=True)
        >>> full(Embeddings(x), Embeddings(x[[0, 0, 1, 2, 3]]), caption_item=[0, 0, 1, 2, 3])["rsum"]
        600.0
    """
    cap = _check_embeddings(images, captions, caption_item)
    sim = _score(images, captions, alpha, sketch_weight, chunk_size, progress, "scoring")
    return retrieval_metrics(sim, cap, groups, progress=progress)


def coco1k(images: Embeddings, captions: Embeddings, caption_item, groups=None, alpha: float = 16.0,
           sketch_weight: float = 0.0, chunk_size=None, progress: bool = False, fold_size: int = 1000,
           num_folds: int = 5, return_folds: bool = False):
    """COCO 1K: `num_folds` consecutive folds of `fold_size` items with their captions; the mean of every metric.

    Each fold scores its items against its own captions only; every metric, RSUM included, is then averaged over
    the folds (ALGORITHMS.md §0; "1K" numbers from the first fold alone are not comparable).

    Args:
        images: `Embeddings` of exactly `num_folds · fold_size` items (5,000 for the COCO test split).
        captions, caption_item, groups, alpha, sketch_weight, chunk_size, progress: as in `full`.
        fold_size: items per fold (1,000 for COCO).
        num_folds: number of folds (5 for COCO).
        return_folds: also return the list of per-fold metric dicts.

    Returns:
        the mean metric dict (keys `METRIC_KEYS`), or `(mean, folds)` with `return_folds=True`.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import Embeddings
        >>> from tfemde.evaluation import coco1k
        >>> x = np.random.default_rng(0).normal(size=(10, 2, 8)).astype("float32")
        >>> images = Embeddings(x / np.linalg.norm(x, axis=-1, keepdims=True))
        >>> caption_item = np.repeat(np.arange(10), 2)  # two captions per image
        >>> mean, folds = coco1k(images, images.take(caption_item), caption_item, fold_size=2, return_folds=True)
        >>> len(folds), mean["rsum"]
        (5, 600.0)
    """
    cap = _check_embeddings(images, captions, caption_item)
    fold_size, num_folds = int(fold_size), int(num_folds)
    if fold_size < 1 or num_folds < 1:
        raise ValueError(f"fold_size and num_folds must be positive; got {fold_size} and {num_folds}")
    if len(images) != fold_size * num_folds:
        raise ValueError(f"coco1k needs exactly num_folds * fold_size = {num_folds} * {fold_size} = "
                         f"{num_folds * fold_size} items; got {len(images)} (use `full` for other sizes)")
    if groups is not None and np.shape(groups) != (len(images),):
        raise ValueError(f"groups must have shape [N_items] = ({len(images)},); got shape {np.shape(groups)}")
    folds: List[Dict[str, float]] = []
    for f in range(num_folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        in_fold = np.flatnonzero((cap >= lo) & (cap < hi))
        if in_fold.size == 0:
            raise ValueError(f"fold {f} (items {lo}..{hi - 1}) has no captions")
        sim = _score(images[lo:hi], captions.take(in_fold), alpha, sketch_weight, chunk_size, progress,
                     f"scoring fold {f + 1}/{num_folds}")
        folds.append(retrieval_metrics(sim, cap[in_fold] - lo, None if groups is None else np.asarray(groups)[lo:hi],
                                       progress=progress))
    mean = {key: float(np.mean([m[key] for m in folds])) for key in METRIC_KEYS}
    return (mean, folds) if return_folds else mean


PROTOCOLS: Dict[str, Callable[..., Dict[str, float]]] = {"full": full, "coco1k": coco1k}


def protocol_metrics(protocol: str, images: Embeddings, captions: Embeddings, caption_item, **kwargs):
    """Run the named protocol (`"full"` or `"coco1k"`) on embeddings; `kwargs` go to the protocol function."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}; got {protocol!r}")
    return PROTOCOLS[protocol](images, captions, caption_item, **kwargs)


def metrics_line(metrics: Dict[str, float]) -> str:
    """One line: `i2t R@1/5/10 | t2i R@1/5/10 | rsum | medr | meanr`."""
    m = metrics
    return (f"i2t R@1 {m['i2t_r1']:.1f} R@5 {m['i2t_r5']:.1f} R@10 {m['i2t_r10']:.1f} | "
            f"t2i R@1 {m['t2i_r1']:.1f} R@5 {m['t2i_r5']:.1f} R@10 {m['t2i_r10']:.1f} | rsum {m['rsum']:.1f} | "
            f"medr {m['i2t_medr']:.0f}/{m['t2i_medr']:.0f} | meanr {m['i2t_meanr']:.1f}/{m['t2i_meanr']:.1f}")


def format_metrics(rows: dict) -> str:
    """A table of `{name: metrics}` with R@1/5/10 both ways and RSUM (values may be floats or 'mean ± std')."""
    keys = METRIC_KEYS[:7]
    header = f"{'model':<14}" + "".join(f"{k:>14}" for k in keys)
    lines = [header, "-" * len(header)]
    for name, metrics in rows.items():
        cells = [metrics[k] if isinstance(metrics[k], str) else f"{metrics[k]:.1f}" for k in keys]
        lines.append(f"{name:<14}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def mean_std(values) -> str:
    """`"mean ± std"` of a list of numbers, one decimal (population std, as NumPy gives)."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.1f} ± {values.std():.1f}"


CONCEPT_HITS_AT = (1, 5, 10)


def _query_scores(similarity, query_group, item_group, columns):
    """float32 `[Q, N]` scores and the two group arrays as NumPy, or one line when the shapes disagree."""
    sim = np.asarray(similarity, dtype=np.float32)
    query_group, item_group = np.asarray(query_group), np.asarray(item_group)
    if sim.ndim != 2 or sim.shape != (len(query_group), len(item_group)):
        raise ValueError(f"similarity must have shape [Q, {columns}] = ({len(query_group)}, {len(item_group)}); got "
                         f"shape {sim.shape}")
    return sim, query_group, item_group


def concept_ranks(similarity, query_group, item_group) -> np.ndarray:
    """`[Q]` 0-based rank of each query's best-scoring item of its own group among all items.

    Args:
        similarity: `[Q, N_items]` scores of the concept queries against the whole gallery.
        query_group: `[Q]` the group each query names.
        item_group: `[N_items]` group per item.

    Ties count against the model, as in `retrieval_ranks`: an item of another group scoring equal to the best
    match ranks ahead of it.
    """
    sim, query_group, item_group = _query_scores(similarity, query_group, item_group, "N_items")
    match = query_group[:, None] == item_group[None, :]
    if not match.any(axis=1).all():
        raise ValueError("every query_group must have at least one item in item_group")
    best = np.where(match, sim, -np.inf).max(axis=1)
    return (np.where(match, -np.inf, sim) >= best[:, None]).sum(axis=1)



IMAGE_RECALL_AT = (1, 5, 10)


def image_retrieval_metrics(similarity, query_group, gallery_group) -> Dict[str, float]:
    """Image-to-image retrieval by group (street-to-shop style): mAP and R@1/5/10, in percent.

    For every query the relevant gallery items are those of its group. AP is the mean precision at the ranks of
    the relevant items; R@K is the share of queries with a relevant item in the top K. Ties count against the model
    (an irrelevant item scoring equal to a relevant one ranks ahead of it). Queries whose group has no gallery item
    are left out (`queries` counts the others, `skipped` them).

    Args:
        similarity: `[Q, G]` scores of the query images against the gallery.
        query_group: `[Q]` group per query.
        gallery_group: `[G]` group per gallery item.

    Returns:
        `{"map", "r1", "r5", "r10", "queries", "skipped"}`.

    Example:
        >>> import numpy as np
        >>> s = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
        >>> m = image_retrieval_metrics(s, [0, 1], [0, 1, 1])
        >>> round(m["map"], 2), m["r1"]
        (100.0, 100.0)
    """
    sim, query_group, gallery_group = _query_scores(similarity, query_group, gallery_group, "G")
    relevant = query_group[:, None] == gallery_group[None, :]
    has = relevant.any(axis=1)
    sim, relevant = sim[has], relevant[has]
    if not len(sim):
        raise ValueError("no query has a relevant item in the gallery (no shared group)")
    # irrelevant before relevant on ties: a stable sort by relevance, then a stable sort by score
    by_relevance = np.argsort(relevant, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(sim, by_relevance, axis=1), axis=1, kind="stable")
    ranked = np.take_along_axis(relevant, np.take_along_axis(by_relevance, by_score, axis=1), axis=1)
    hits = np.cumsum(ranked, axis=1)
    precision = hits / np.arange(1, ranked.shape[1] + 1)[None, :]
    average_precision = (precision * ranked).sum(axis=1) / ranked.sum(axis=1)
    out = {"map": float(100.0 * average_precision.mean())}
    for k in IMAGE_RECALL_AT:
        out[f"r{k}"] = float(100.0 * ranked[:, :k].any(axis=1).mean())
    out.update(queries=int(len(sim)), skipped=int((~has).sum()))
    return out
