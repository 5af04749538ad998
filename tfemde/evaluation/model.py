"""Metrics of a trained model on a data set: `evaluate` (a model, a `Run` or a run folder), `evaluate_encoded`
(an `EvalData`, what the validation callback uses) and `concept_queries` (every concept's name over the gallery).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import numpy as np

from tfemde.evaluation.encode import encode_dataset, encode_items
from tfemde.evaluation.metrics import CONCEPT_HITS_AT, concept_ranks, image_retrieval_metrics, protocol_metrics
from tfemde.serving import similarity as set_similarity
from tfemde.serving.centroids import group_centroids

TASKS = ("image_text", "i2i")
GALLERIES = ("items", "centroids")


def _similarity_kwargs(config):
    return {"alpha": config.alpha, "sketch_weight": config.sketch_weight if config.sketch else 0.0}


def evaluate_encoded(model, eval_data, protocol="full", progress=False, **protocol_kwargs) -> Dict[str, float]:
    """Metrics of `model` on an `EvalData` (what the validation callback uses)."""
    items, captions = encode_dataset(model, eval_data, progress=progress)
    return protocol_metrics(protocol, items, captions, eval_data.caption_item, groups=eval_data.item_group,
                            progress=progress, **_similarity_kwargs(model.config), **protocol_kwargs)


def _resolve(model, tokenizer, dataset):
    """`(DualEncoder, tokenizer, Dataset)` from a model, a `Run` or a run folder, and a data set or its name/path."""
    from tfemde.models.run_folder import Run, open_run, resolve_dataset

    if isinstance(model, (str, os.PathLike)):
        model = open_run(model)
    if isinstance(model, Run):
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    return model, tokenizer, resolve_dataset(dataset)


def evaluate(model, dataset, split=None, protocol="full", tokenizer=None, max_length=None, batch_size=256,
             progress=True, task="image_text", query_style=None, gallery_style=None, gallery="items",
             centroid_method="slot_mean", **protocol_kwargs) -> Dict[str, float]:
    """Retrieval metrics of a trained model on a data set: embeddings once, the similarity in chunks.

    Args:
        model: a `DualEncoder`, a `tfemde.training.runs.Run`, or the path of a run folder (which also gives the tokenizer).
        dataset: a `Dataset`, or a name/path for `tfemde.data.load` (e.g. `"emoji"`).
        split: evaluate this split of `dataset` (`"val"`, `"test"`); None uses all of `dataset`.
        protocol: `"full"` (all items against all captions) or `"coco1k"` (mean over five folds of 1,000 items).
        tokenizer: the run's `Tokenizer` (not needed when `model` is a run).
        max_length, batch_size: encoding settings (default max_length: the model config's).
        progress: progress bars while encoding and scoring.
        task: `"image_text"` (both directions between images and captions) or `"i2i"` (image to image across
            styles, `evaluate_images`: `query_style`, `gallery_style`, `gallery`, `centroid_method`).
        **protocol_kwargs: passed to the protocol (e.g. `fold_size`, `chunk_size`).

    Returns:
        the metric dict of `retrieval_metrics` (recalls in percent, `rsum`, median and mean ranks), or of
        `image_retrieval_metrics` for `task="i2i"`.

    Example:
        >>> # metrics = evaluate("runs/quickstart/dive_temde", "emoji", split="test")
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if task == "i2i":
        return evaluate_images(model, dataset, query_style, gallery_style, split=split, tokenizer=tokenizer,
                               gallery=gallery, centroid_method=centroid_method, batch_size=batch_size,
                               progress=progress)
    model, tokenizer, dataset = _resolve(model, tokenizer, dataset)
    if split is not None:
        dataset = dataset.split(split)
    if dataset.num_items == 0 or dataset.num_captions == 0:
        where = f"split {split!r}" if split is not None else "it"
        raise ValueError(f"data set {dataset.name!r} has no items and captions to evaluate in {where} "
                         f"({dataset.num_items} items, {dataset.num_captions} captions)")
    items, captions = encode_dataset(model, dataset, tokenizer, max_length, batch_size, progress)
    return protocol_metrics(protocol, items, captions, dataset.caption_item, groups=dataset.item_group,
                            progress=progress, **_similarity_kwargs(model.config), **protocol_kwargs)


def evaluate_images(model, dataset, query_style, gallery_style, split=None, tokenizer=None, gallery="items",
                    centroid_method="slot_mean", batch_size=256, progress=True) -> Dict[str, float]:
    """Image-to-image retrieval across styles (street photo → catalogue photo): mAP and R@1/5/10 by group.

    The images of `query_style` search those of `gallery_style` with the model's similarity; a gallery image of the
    query's group is a match. With `gallery="centroids"` the gallery is one entry per group
    (`tfemde.serving.centroids.group_centroids`).

    Args:
        model: a `DualEncoder`, a `Run` or a run folder.
        dataset: a `Dataset` with `item_styles` (e.g. `load("emoji", styles=("noto", "twemoji"))`), or a name/path.
        query_style, gallery_style: the styles of the queries and of the gallery (two different styles).
        split: this split only (None: all of `dataset`).
        tokenizer: the run's tokenizer (to build the evaluation pipeline; not needed for a run).
        gallery: `"items"` (every gallery image) or `"centroids"` (one per group).
        centroid_method: how a set head's group is summarised (`tfemde.serving.centroids.METHODS`).

    Returns:
        `{"map", "r1", "r5", "r10", "queries", "skipped", "gallery_size"}`.
    """
    if gallery not in GALLERIES:
        raise ValueError(f"gallery must be one of {', '.join(GALLERIES)}; got {gallery!r}")
    model, tokenizer, dataset = _resolve(model, tokenizer, dataset)
    if split is not None:
        dataset = dataset.split(split)
    if dataset.item_styles is None:
        raise ValueError(f"data set {dataset.name!r} has no item_styles; image-to-image retrieval across styles needs "
                         "them, e.g. load('emoji', styles=('noto', 'twemoji'))")
    styles = sorted(set(np.asarray(dataset.item_styles).tolist()))
    for name, style in (("query_style", query_style), ("gallery_style", gallery_style)):
        if style not in styles:
            raise ValueError(f"{name} must be one of the data set's styles {styles}; got {style!r}")
    if query_style == gallery_style:
        raise ValueError(f"query_style and gallery_style must be different styles; got {query_style!r} twice")
    if tokenizer is None:
        raise ValueError("evaluate_images needs tokenizer= (the run's Tokenizer) when given a bare model")
    queries = np.flatnonzero(dataset.item_styles == query_style)
    targets = np.flatnonzero(dataset.item_styles == gallery_style)
    embeddings = encode_items(model, dataset.subset(np.union1d(queries, targets)), tokenizer, batch_size, progress)
    position = {item: row for row, item in enumerate(np.union1d(queries, targets))}
    pick = lambda items: embeddings.take([position[i] for i in items])  # noqa: E731
    query_embeddings, gallery_embeddings = pick(queries), pick(targets)
    gallery_group = dataset.item_group[targets]
    if gallery == "centroids":
        gallery_embeddings, gallery_group = group_centroids(gallery_embeddings, gallery_group, centroid_method)
    scores = set_similarity(query_embeddings, gallery_embeddings, **_similarity_kwargs(model.config))
    out = image_retrieval_metrics(scores, dataset.item_group[queries], gallery_group)
    out["gallery_size"] = int(len(gallery_group))
    return out


# ---------------------------------------------------------------------------------------------- concept queries
def concept_names(dataset) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """One text query per concept (group): the first caption of the group's first item that has a caption.

    For the emoji data that is the emoji's CLDR name ("red heart", "rocket"), what a person would type.

    Returns:
        `(names, groups, splits)`: `Q` query strings, their `[Q]` group ids and `[Q]` splits (of that first item).
    """
    first_caption = np.full(dataset.num_items, -1, dtype=np.int64)
    for caption in range(len(dataset.caption_item) - 1, -1, -1):
        first_caption[dataset.caption_item[caption]] = caption
    names, groups, splits, seen = [], [], [], set()
    for item in range(dataset.num_items):
        group = int(dataset.item_group[item])
        if group in seen or first_caption[item] < 0:
            continue
        seen.add(group)
        names.append(dataset.captions[first_caption[item]])
        groups.append(group)
        splits.append(str(dataset.item_split[item]))
    return names, np.asarray(groups, dtype=np.int64), np.asarray(splits, dtype=str)


def caption_words(text: str) -> List[str]:
    """The words of a caption: its lower-cased runs of letters and digits (`"Flag: Japan"` -> `["flag", "japan"]`)."""
    return re.findall(r"[^\W_]+", text.lower())


def names_with_unseen_words(names, dataset) -> np.ndarray:
    """`[Q]` bool: whether each name holds a word that no training-split caption of `dataset` contains.

    A text tower that learns from the captions alone has never seen such a word, so a concept query with one
    measures what the model can guess, not what it learnt (`concept_queries` reports the two kinds apart).
    """
    training = dataset.item_split[dataset.caption_item] == "train"
    seen = {word for caption in np.asarray(dataset.captions, dtype=object)[training] for word in caption_words(caption)}
    return np.array([any(word not in seen for word in caption_words(name)) for name in names], dtype=bool)


def concept_queries(model, dataset, tokenizer=None, max_length=None, batch_size=256, progress=False) -> dict:
    """Search every concept's name over the whole gallery (all splits): hit@1/5/10 per split of the concept.

    A hit@K is a query whose concept has an image among the top K of all `dataset`'s items. With the emoji data
    (split by concept) train-split concepts measure fitting, test-split ones generalisation to unseen concepts.

    Args:
        model: a `DualEncoder`, a `tfemde.training.runs.Run`, or the path of a run folder.
        dataset: a `Dataset` or a name/path for `tfemde.data.load`; all of it is the gallery.
        tokenizer, max_length, batch_size, progress: as in `evaluate`.

    Returns:
        `{split: {"hit@1", "hit@5", "hit@10" (percent), "queries", "seen_words", "unseen_words", "new_images"}}`
        for each split that has concepts, where `seen_words` / `unseen_words` hold the same figures for the names
        whose words all occur in training captions / that hold a word no training caption contains
        (`names_with_unseen_words`; a part without queries is left out), and, for the splits other than `"train"`,
        `new_images` the same queries searched over the items outside the training split only: how well the model
        places images it never trained on among each other, without the training images (fitted to their own
        captions) ahead of them.
    """
    from tfemde.data import Dataset

    model, tokenizer, dataset = _resolve(model, tokenizer, dataset)
    names, groups, splits = concept_names(dataset)
    first_item = np.array([np.flatnonzero(dataset.item_group == g)[0] for g in groups], dtype=np.int64)
    queries = Dataset(name=f"{dataset.name}:concepts", captions=names, caption_item=first_item,
                      item_split=dataset.item_split, item_group=dataset.item_group, images=dataset.images,
                      image_paths=dataset.image_paths, regions=dataset.regions, region_rows=dataset.region_rows)
    items, texts = encode_dataset(model, queries, tokenizer, max_length, batch_size, progress)
    scores = set_similarity(texts, items, **_similarity_kwargs(model.config))
    ranks = concept_ranks(scores, groups, dataset.item_group)
    unseen = names_with_unseen_words(names, dataset)
    new_items = dataset.item_split != "train"
    out = {}
    for split in ("train", "val", "test"):
        in_split = splits == split
        if in_split.any():
            out[split] = _hits(ranks[in_split])
            for part, chosen in (("seen_words", in_split & ~unseen), ("unseen_words", in_split & unseen)):
                if chosen.any():
                    out[split][part] = _hits(ranks[chosen])
            if split != "train":
                scores_new = np.asarray(scores)[np.ix_(in_split, new_items)]
                out[split]["new_images"] = _hits(concept_ranks(scores_new, groups[in_split],
                                                               dataset.item_group[new_items]))
    return out


def _hits(ranks) -> dict:
    return {**{f"hit@{k}": float(100.0 * (ranks < k).mean()) for k in CONCEPT_HITS_AT}, "queries": int(len(ranks))}
