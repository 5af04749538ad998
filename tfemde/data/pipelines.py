"""tf.data pipelines: shuffled, augmented training batches and ordered evaluation batches of a `Dataset`.

Training elements are (item, caption) pairs, one per caption, so an image with 5 captions appears 5 times per
epoch and several of its captions may share a batch; `image_id` in every batch lets the loss mask all positives.

Batches are dicts:

* `image` `[B, H, W, 3]` float32 in [0, 1] (datasets of kind `images` or `image_files`), or
  `regions` `[B, R, F]` float32 with `region_mask` `[B, R]` bool (kind `regions`);
* `caption_ids` `[B, T]` int32 (0 = padding) and `caption_mask` `[B, T]` bool, `T = max_length` (or less in
  training batches grouped by length, see `train_dataset`'s `bucket_width`);
* `image_id` `[B]` int64 (the item index in the dataset), `group_id` `[B]` int64 (the item's group) and
  `caption_id` `[B]` int64 (the caption index); training batches also carry `text_id` `[B]` int64, equal for
  captions whose texts are equal up to case and spacing (the loss treats those as positives of each other's images).

Image preprocessing: files are decoded by `tfemde.images.decode_image` (Pillow, run through `tf.numpy_function`), the
serving runtime's decoder too: any format Pillow reads, first frame, high bit depths scaled to 8 bits, transparency
composited over white, squashed to `image_size` with antialiased bilinear interpolation, rounded to uint8; the model
sees the uint8 values divided by 255.

Augmentations (training only, each switchable, all drawn from stateless random ops seeded per batch): see
`tfemde.data.augmentation`.

Determinism: given `seed` (and TensorFlow's global seed, which `keras.utils.set_random_seed` sets), two datasets built
alike give identical batches, epoch after epoch; each new iteration over the dataset (each `fit` epoch) reshuffles
and redraws the augmentations.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from tfemde.data.augmentation import NO_AUGMENTATION  # noqa: F401 - tfemde.data exports it from here
from tfemde.data.augmentation import augment_captions, augment_images, region_drop_mask
from tfemde.data.dataset import SPLITS, Dataset
from tfemde.data.sampling import SEED_OFFSET as _AUGMENT_SEED_OFFSET
from tfemde.data.sampling import group_balanced_draws, grouped_by_length, groups_times_instances
from tfemde.images import decode_image
from tfemde.text import Tokenizer

AUTOTUNE = tf.data.AUTOTUNE
CACHE_MAX_BYTES = 2 << 30


def pipeline_options() -> tf.data.Options:
    """The options of every tfemde pipeline: deterministic order, no tf.data autotuning, sharding by data.

    With autotuning on, Keras' `fit` stalled for 16-20 s at the start of about every other epoch (quickstart at
    batch 64, 2-core Xeon, TensorFlow 2.21): at each epoch boundary Keras drops the iterator it created ahead, and
    the destructor of an autotuned iterator waits for the autotuning thread (py-spy: `~RootDataset::Iterator` ->
    `~LogicalThreadWrapper` -> `WaitForNotification`). Without it, `AUTOTUNE` parallelism is the number of cores;
    the step time did not change and the stalls were gone (`benchmarks/pipeline.py --epoch-gaps`).
    """
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    # Under MultiWorkerMirroredStrategy each worker keeps its own part of every global batch. The pipelines read
    # arrays, not files, so sharding by file (the AUTO default's first try) would only warn and fall back to this.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


# ---------------------------------------------------------------------------------------------- argument checks
def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _check_probability(name, value):
    if not isinstance(value, (int, float, np.floating, np.integer)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1]; got {value!r}")
    return float(value)


def _check_image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in image_size)):
        raise ValueError(f"image_size must be None, a positive int or (height, width); got {image_size!r}")
    return (int(image_size[0]), int(image_size[1]))


def _check_common(dataset, tokenizer, batch_size, max_length, split, image_size):
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a tfemde.data.Dataset; got {type(dataset).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a tfemde.text.Tokenizer; got {type(tokenizer).__name__}. "
                        f"Make one with Tokenizer.train(dataset.captions) or Tokenizer.load(path).")
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be None or one of {SPLITS}; got {split!r}")
        dataset = dataset.split(split)
    batch_size = _check_int("batch_size", batch_size)
    max_length = _check_int("max_length", max_length)
    image_size = _check_image_size(image_size)
    if dataset.kind == "images":
        images = dataset.images
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"dataset.images must be uint8 with shape [N, H, W, 3]; got dtype {images.dtype}, "
                             f"shape {images.shape}")
    elif dataset.kind == "image_files" and image_size is None:
        raise ValueError("image_size is required for a dataset of image files (they may differ in size); "
                         "got None. Pass e.g. image_size=224.")
    elif dataset.kind == "regions" and len(dataset.regions.shape) != 3:
        raise ValueError(f"dataset.regions must have shape [rows, R, F]; got shape {tuple(dataset.regions.shape)}")
    return dataset, batch_size, max_length, image_size


# ---------------------------------------------------------------------------------------------- captions
class _TokenTable:
    """All captions tokenized once with the `sentencepiece` library, kept as one ragged int32 tensor."""

    def __init__(self, tokenizer: Tokenizer, captions, max_tokens: int):
        pieces = tokenizer.tokenize(list(captions))
        lengths = np.fromiter((min(len(p), max_tokens) for p in pieces), dtype=np.int64, count=len(pieces))
        values = np.fromiter((t for p in pieces for t in p[:max_tokens]), dtype=np.int32, count=int(lengths.sum()))
        row_splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.lengths = lengths
        self.values = tf.constant(values)
        self.row_splits = tf.constant(row_splits)

    def gather(self, caption_index):
        """`[B, None]` ragged ids of the given captions."""
        table = tf.RaggedTensor.from_row_splits(self.values, self.row_splits, validate=False)
        return tf.gather(table, caption_index)


def _pad(tokens, max_length, batch_size=None):
    """`[B, T]` ids and mask of ragged `tokens` cut to `T = max_length` (an int, or a scalar tensor)."""
    tokens = tokens[:, :max_length]
    ids = tokens.to_tensor(default_value=0, shape=[batch_size, max_length])
    mask = tf.sequence_mask(tokens.row_lengths(), max_length)
    static_length = max_length if isinstance(max_length, int) else None
    ids.set_shape([batch_size, static_length])
    mask.set_shape([batch_size, static_length])
    return ids, mask


def caption_text_ids(captions) -> np.ndarray:
    """`[N]` int64: the same id for captions whose texts are equal after casefolding and collapsing whitespace."""
    normalized = [" ".join(str(caption).casefold().split()) for caption in captions]
    return np.unique(np.asarray(normalized, dtype=object), return_inverse=True)[1].astype(np.int64).reshape(-1)


# ---------------------------------------------------------------------------------------------- regions
def _read_regions(dataset, items, num_regions, num_features):
    """`[B, R, F]` float32 features of `items`, read from the (memory-mapped) array only for these rows.

    NumPy reads each distinct row once, in ascending row order (one sequential copy out of the memory map); the
    batch order is restored by a gather in TensorFlow, outside the GIL.
    """

    def read(items):
        rows = items if dataset.region_rows is None else dataset.region_rows[items]
        unique, inverse = np.unique(rows, return_inverse=True)
        return np.asarray(dataset.regions[unique], dtype=np.float32), inverse.astype(np.int64).reshape(-1)

    block, inverse = tf.numpy_function(read, [items], (tf.float32, tf.int64), stateful=False)
    block.set_shape([None, num_regions, num_features])
    regions = tf.gather(block, inverse)
    regions.set_shape([items.shape[0], num_regions, num_features])
    return regions


# ---------------------------------------------------------------------------------------------- images
def decode_image_file(path, image_size):
    """Reads and decodes one image file to `[H, W, 3]` uint8 at `image_size`, inside tf.data.

    It runs `tfemde.images.decode_image` (Pillow; the serving runtime's decoder too) through `tf.numpy_function`, so
    training and serving see the same pixels for every format; an unreadable file fails with a message naming it.
    """
    height, width = image_size

    def decode(file_name):
        return decode_image(file_name, (height, width))

    image = tf.numpy_function(decode, [path], tf.uint8, stateful=False, name="decode_image")
    image.set_shape([height, width, 3])
    return image


def _resize_uint8(images, image_size, chunk=512):
    """Resizes `[N, H, W, 3]` uint8 images once (antialiased bilinear), returning uint8 NumPy."""
    out = np.empty((len(images),) + tuple(image_size) + (3,), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = tf.image.resize(tf.cast(images[start:start + chunk], tf.float32), image_size, antialias=True)
        out[start:start + chunk] = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8).numpy()
    return out


def _to_float(images):
    return tf.cast(images, tf.float32) / 255.0


def _decoded_bytes(num_items, image_size):
    return num_items * image_size[0] * image_size[1] * 3


# ---------------------------------------------------------------------------------------------- training
def train_dataset(dataset: Dataset, tokenizer: Tokenizer, batch_size: int, max_length: int = 32, seed: int = 0,
                  image_size=None, region_drop: float = 0.2, caption_augment: float = 0.2,
                  image_augment: bool = True, flip: bool = True, crop_scale: float = 0.8, shuffle: bool = True,
                  repeat: bool = False, cache: bool = True, split: Optional[str] = None,
                  cache_max_bytes: int = CACHE_MAX_BYTES, bucket_width: int = 0,
                  balance_groups: bool = False, instances_per_group: int = 0) -> tf.data.Dataset:
    """Shuffled, augmented training batches of (item, caption) pairs, one element per caption.

    Args:
        dataset: a `tfemde.data.Dataset` (of kind `images`, `image_files` or `regions`).
        tokenizer: a `tfemde.text.Tokenizer`; captions are tokenized once, with the `sentencepiece` library.
        batch_size: `B`, pairs per batch. The last incomplete batch of an epoch is dropped (static shapes), so
            `batch_size` must not exceed the number of captions.
        max_length: `T`, caption length after truncation and padding.
        seed: seed of the shuffle and of every augmentation.
        image_size: `(H, W)` or an int; required for image files, optional for in-memory images (default: their
            size; other sizes are resized once, up front). Ignored for regions.
        region_drop: probability of dropping each region (regions only; 0 disables).
        caption_augment: probability of augmenting each caption token (0 disables; then `caption_ids` are exactly
            `tokenizer.encode(captions, max_length)`).
        image_augment: random crop and flip of images (images only).
        flip: whether image augmentation flips horizontally (turn off when mirror images mean something else).
        crop_scale: smallest kept side fraction of the random crop (1.0 disables cropping).
        shuffle: shuffle the pairs (a full shuffle of pair indices, reshuffled every epoch).
        repeat: repeat forever (then pass `steps_per_epoch` to `fit`); otherwise one pass is one epoch.
        cache: for image files, keep the decoded, resized images in memory after the first pass when they take at
            most `cache_max_bytes` (otherwise files are decoded every epoch). No effect on the other kinds: in-memory
            images need no cache and regions are read per batch from their memory map.
        split: if given, use only this split of `dataset` (`"train"`, `"val"` or `"test"`).
        cache_max_bytes: the memory budget of `cache`.
        bucket_width: 0 pads every caption to `max_length`. A width `w > 0` batches captions of about the same
            length together (each epoch's shuffled captions are grouped by `ceil(length / w)`, cut into batches,
            and the batches shuffled) and pads each batch only to the next multiple of `w` above its longest
            caption (at most `max_length`), so the text tower runs fewer steps; the model's outputs do not depend
            on the padding. The batches of an epoch are as many as without buckets.
        balance_groups: draw each epoch's pairs with replacement so that every group is seen equally often.
        instances_per_group: `M > 0` makes every batch `B / M` groups drawn at random (without repeats in a batch)
            times `M` of their items (different items while the group has them), each with one of its captions at
            random: the P x M sampling of centroid and triplet losses (centroids-reid). `B` must be a multiple of
            `M`; the batches of an epoch are as many as without it, and `bucket_width` then only pads each batch to
            its longest caption (the batches are not regrouped by length).

    Returns:
        A `tf.data.Dataset` of dict batches (see the module doc): `image` `[B, H, W, 3]` float32 or `regions`
        `[B, R, F]` float32 + `region_mask` `[B, R]` bool; `caption_ids` `[B, T]` int32; `caption_mask` `[B, T]`
        bool; `image_id`, `group_id`, `caption_id`, `text_id` `[B]` int64.

    Example:
    >>> import numpy as np
    >>> from tfemde.data import Dataset, train_dataset
    >>> from tfemde.text import Tokenizer
    >>> ds = Dataset("toy", captions=["a red square", "a blue circle", "red", "blue"], caption_item=[0, 1, 0, 1],
    ...              item_split=["train"] * 2, item_group=[0, 1], images=np.zeros((2, 8, 8, 3), np.uint8))
    >>> tok = Tokenizer.train(ds.captions * 5, vocab_size=18)
    >>> batch = next(iter(train_dataset(ds, tok, batch_size=2, max_length=4)))
    >>> tuple(batch["image"].shape), tuple(batch["caption_ids"].shape)
    ((2, 8, 8, 3), (2, 4))
    """
    dataset, batch_size, max_length, image_size = _check_common(dataset, tokenizer, batch_size, max_length, split,
                                                                image_size)
    region_drop = _check_probability("region_drop", region_drop)
    caption_augment = _check_probability("caption_augment", caption_augment)
    if not isinstance(crop_scale, (int, float)) or not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale must be in (0, 1]; got {crop_scale!r}")
    seed = _check_int("seed", seed, minimum=0)
    num_captions = dataset.num_captions
    if num_captions == 0:
        raise ValueError(f"dataset {dataset.name!r} has no captions to train on")
    if batch_size > num_captions:
        raise ValueError(f"batch_size must be at most the number of captions ({num_captions}) of dataset "
                         f"{dataset.name!r}, since incomplete batches are dropped; got {batch_size}")

    kind = dataset.kind
    # With augmentation, keep some tokens beyond max_length so that deletions are filled by the following tokens.
    tokens = _TokenTable(tokenizer, dataset.captions, 2 * max_length if caption_augment > 0 else max_length)
    caption_item = tf.constant(dataset.caption_item, dtype=tf.int64)
    item_group = tf.constant(dataset.item_group, dtype=tf.int64)
    text_id = tf.constant(caption_text_ids(dataset.captions), dtype=tf.int64)
    mask_id = tokenizer.mask_id
    normal_ids = tf.constant(tokenizer.normal_ids, dtype=tf.int32)

    bucket_width = _check_int("bucket_width", bucket_width, minimum=0)
    caption_length = tf.constant(np.minimum(tokens.lengths, max_length), dtype=tf.int64)
    if not isinstance(balance_groups, bool):
        raise ValueError(f"balance_groups must be True or False; got {balance_groups!r}")
    if balance_groups and not shuffle:
        raise ValueError("balance_groups=True draws pairs at random, so it needs shuffle=True")
    instances_per_group = _check_int("instances_per_group", instances_per_group, minimum=0)
    if instances_per_group:
        if batch_size % instances_per_group:
            raise ValueError(f"batch_size must be a multiple of instances_per_group ({instances_per_group}); got "
                             f"{batch_size}")
        if balance_groups or not shuffle:
            raise ValueError("instances_per_group draws groups at random; it cannot be combined with "
                             "balance_groups=True or shuffle=False")
    if instances_per_group:
        pairs = groups_times_instances(dataset, batch_size, instances_per_group, seed)
    elif balance_groups:
        pairs = group_balanced_draws(dataset, seed)
    else:
        pairs = tf.data.Dataset.range(num_captions)
        if shuffle:
            pairs = pairs.shuffle(num_captions, seed=seed, reshuffle_each_iteration=True)
    if bucket_width and not instances_per_group:
        pairs = grouped_by_length(pairs, num_captions, batch_size, caption_length, bucket_width, seed, shuffle)
    if repeat:
        pairs = pairs.repeat()

    pixels = None
    whole = None
    if kind == "images":
        images = dataset.images
        if image_size is not None and tuple(images.shape[1:3]) != image_size:
            images = _resize_uint8(images, image_size)
        pixels = tf.constant(images)
    elif kind == "image_files":
        paths = tf.constant(np.asarray(dataset.image_paths, dtype=str))
        decode = lambda item: decode_image_file(tf.gather(paths, item), image_size)  # noqa: E731
        if cache and _decoded_bytes(dataset.num_items, image_size) <= cache_max_bytes:
            # All items decoded once (in tf.data, in parallel) into one cached [N, H, W, 3] tensor, then gathered.
            whole = (tf.data.Dataset.range(dataset.num_items).map(decode, num_parallel_calls=AUTOTUNE)
                     .batch(dataset.num_items).cache().repeat())
        else:
            pairs = pairs.map(lambda c: (c, decode(tf.gather(caption_item, c))), num_parallel_calls=AUTOTUNE)
    else:
        num_regions, num_features = (int(s) for s in dataset.regions.shape[1:])

    batches = pairs.batch(batch_size, drop_remainder=True)
    seeds = tf.data.Dataset.random(seed=seed + _AUGMENT_SEED_OFFSET, rerandomize_each_iteration=True)
    parts = (batches, seeds) if whole is None else (batches, seeds, whole)

    def make_batch(pair, batch_seed, all_images=None):
        if isinstance(pair, tuple):
            caption_index, streamed_images = pair
        else:
            caption_index, streamed_images = pair, None
        batch_seed = tf.stack([batch_seed, tf.constant(0, tf.int64)])
        items = tf.gather(caption_item, caption_index)
        out = {}
        if kind == "regions":
            out["regions"] = _read_regions(dataset, items, num_regions, num_features)
            if region_drop > 0:
                out["region_mask"] = region_drop_mask(batch_size, num_regions, batch_seed + [1, 0], region_drop)
            else:
                out["region_mask"] = tf.ones([batch_size, num_regions], tf.bool)
        else:
            if streamed_images is not None:
                images = streamed_images
            else:
                images = tf.gather(pixels if all_images is None else all_images, items)
            if image_augment and (flip or crop_scale < 1.0):
                out["image"] = augment_images(images, batch_seed + [2, 0], crop_scale, flip)
            else:
                out["image"] = _to_float(images)
        caption = tokens.gather(caption_index)
        if caption_augment > 0:
            caption = augment_captions(caption, batch_seed + [3, 0], caption_augment, mask_id, normal_ids)
        length = max_length
        if bucket_width:
            longest = tf.maximum(tf.reduce_max(tf.gather(caption_length, caption_index)), 1)
            length = tf.minimum((longest + bucket_width - 1) // bucket_width * bucket_width, max_length)
        out["caption_ids"], out["caption_mask"] = _pad(caption, length, batch_size)
        out["image_id"] = items
        out["group_id"] = tf.gather(item_group, items)
        out["caption_id"] = caption_index
        out["text_id"] = tf.gather(text_id, caption_index)
        return out

    result = tf.data.Dataset.zip(parts).map(make_batch, num_parallel_calls=AUTOTUNE)
    if bucket_width or instances_per_group:  # unbatch hides the length of an epoch, which fit's schedule needs
        result = result.apply(tf.data.experimental.assert_cardinality(
            tf.data.INFINITE_CARDINALITY if repeat else num_captions // batch_size))
    return result.with_options(pipeline_options()).prefetch(AUTOTUNE)


# ---------------------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True, eq=False)
class EvalData:
    """What evaluation needs to score every item against every caption.

    Attributes:
        items: `tf.data.Dataset` of dict batches over every item once, in index order: `image` `[b, H, W, 3]` float32
            or `regions` `[b, R, F]` float32 + `region_mask` `[b, R]` bool (all True), and `image_id`, `group_id`
            `[b]` int64. The last batch may be smaller.
        captions: `tf.data.Dataset` of dict batches over every caption once, in index order: `caption_ids`
            `[b, T]` int32, `caption_mask` `[b, T]` bool, `caption_id`, `image_id`, `group_id` `[b]` int64.
        caption_item: `[M]` int64, the item of each caption (the ground truth of text→image).
        item_group: `[N]` int64, the group of each item (items of one group count as matches).
    """

    items: tf.data.Dataset
    captions: tf.data.Dataset
    caption_item: np.ndarray
    item_group: np.ndarray

    @property
    def num_items(self) -> int:
        return len(self.item_group)

    @property
    def num_captions(self) -> int:
        return len(self.caption_item)


def eval_dataset(dataset: Dataset, tokenizer: Tokenizer, batch_size: int, max_length: int = 32,
                 image_size=None, cache: bool = True, split: Optional[str] = None,
                 cache_max_bytes: int = CACHE_MAX_BYTES) -> EvalData:
    """Ordered, unaugmented batches of every item and every caption, for the full similarity matrix.

    Args:
        dataset: a `tfemde.data.Dataset`.
        tokenizer: a `tfemde.text.Tokenizer`.
        batch_size: batch size of both streams (the last batch of each may be smaller).
        max_length: `T`, caption length after truncation and padding.
        image_size: as in `train_dataset`.
        cache: for image files, keep the decoded images in memory after the first pass (if they fit in
            `cache_max_bytes`), so that evaluating every epoch decodes them once.
        split: if given, use only this split of `dataset`.
        cache_max_bytes: the memory budget of `cache`.

    Returns:
        An `EvalData` (`items`, `captions`, `caption_item` `[M]`, `item_group` `[N]`).

    Example:
    >>> import numpy as np
    >>> from tfemde.data import Dataset, eval_dataset
    >>> from tfemde.text import Tokenizer
    >>> ds = Dataset("toy", captions=["a red square", "a blue circle", "red"], caption_item=[0, 1, 0],
    ...              item_split=["test"] * 2, item_group=[0, 1], images=np.zeros((2, 8, 8, 3), np.uint8))
    >>> ev = eval_dataset(ds, Tokenizer.train(ds.captions * 5, vocab_size=17), batch_size=2)
    >>> ev.num_items, ev.num_captions, [len(b["caption_id"]) for b in ev.captions]
    (2, 3, [2, 1])
    """
    dataset, batch_size, max_length, image_size = _check_common(dataset, tokenizer, batch_size, max_length, split,
                                                                image_size)
    kind = dataset.kind
    num_items = dataset.num_items
    item_group = tf.constant(dataset.item_group, dtype=tf.int64)
    caption_item = tf.constant(dataset.caption_item, dtype=tf.int64)

    item_index = tf.data.Dataset.range(num_items)
    if kind == "images":
        images = dataset.images
        if image_size is not None and tuple(images.shape[1:3]) != image_size:
            images = _resize_uint8(images, image_size)
        pixels = tf.constant(images)
        items = item_index.batch(batch_size).map(
            lambda i: {"image": _to_float(tf.gather(pixels, i)), "image_id": i, "group_id": tf.gather(item_group, i)},
            num_parallel_calls=AUTOTUNE)
    elif kind == "image_files":
        paths = tf.constant(np.asarray(dataset.image_paths, dtype=str))
        decoded = item_index.map(lambda i: decode_image_file(tf.gather(paths, i), image_size),
                                 num_parallel_calls=AUTOTUNE)
        if cache and _decoded_bytes(num_items, image_size) <= cache_max_bytes:
            decoded = decoded.cache()
        items = tf.data.Dataset.zip((item_index, decoded)).batch(batch_size).map(
            lambda i, x: {"image": _to_float(x), "image_id": i, "group_id": tf.gather(item_group, i)},
            num_parallel_calls=AUTOTUNE)
    else:
        num_regions, num_features = (int(s) for s in dataset.regions.shape[1:])

        def region_batch(i):
            regions = _read_regions(dataset, i, num_regions, num_features)
            return {"regions": regions, "region_mask": tf.ones(tf.shape(regions)[:2], tf.bool), "image_id": i,
                    "group_id": tf.gather(item_group, i)}

        items = item_index.batch(batch_size).map(region_batch, num_parallel_calls=AUTOTUNE)

    tokens = _TokenTable(tokenizer, dataset.captions, max_length)

    def caption_batch(c):
        ids, mask = _pad(tokens.gather(c), max_length)
        i = tf.gather(caption_item, c)
        return {"caption_ids": ids, "caption_mask": mask, "caption_id": c, "image_id": i,
                "group_id": tf.gather(item_group, i)}

    captions = tf.data.Dataset.range(dataset.num_captions).batch(batch_size).map(caption_batch,
                                                                                 num_parallel_calls=AUTOTUNE)
    options = pipeline_options()
    return EvalData(items=items.with_options(options).prefetch(AUTOTUNE),
                    captions=captions.with_options(options).prefetch(AUTOTUNE),
                    caption_item=np.asarray(dataset.caption_item, dtype=np.int64).copy(),
                    item_group=np.asarray(dataset.item_group, dtype=np.int64).copy())
