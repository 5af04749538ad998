"""How `train_dataset` orders an epoch's captions: group-balanced draws, P groups x M instances, length buckets.

Each function returns a `tf.data.Dataset` of caption indices (one epoch, redrawn every epoch from seeds derived
from the pipeline's seed).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# Seeds of the pipeline's random streams are `seed + i * SEED_OFFSET` (i = 1 augmentation, 2 bucket order,
# 3 group-balanced draws, 4 P x M draws), so that no two streams share a seed.
SEED_OFFSET = 104_729


def group_balanced_draws(dataset, seed):
    """`num_captions` caption indices per iteration, drawn with replacement with `P(c) ∝ 1 / captions of c's group`."""
    caption_group = np.asarray(dataset.item_group)[np.asarray(dataset.caption_item)]
    _, inverse, counts = np.unique(caption_group, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse.reshape(-1)]
    cdf = tf.constant(np.cumsum(weights) / weights.sum(), dtype=tf.float64)
    last = dataset.num_captions - 1

    def draw(epoch_seed):
        uniform = tf.random.stateless_uniform([dataset.num_captions], seed=tf.stack([epoch_seed, 0]), dtype=tf.float64)
        return tf.minimum(tf.searchsorted(cdf, uniform, side="right", out_type=tf.int64), last)

    epoch_seeds = tf.data.Dataset.random(seed=seed + 3 * SEED_OFFSET, rerandomize_each_iteration=True)
    return epoch_seeds.take(1).map(draw).unbatch()


def groups_times_instances(dataset, batch_size, instances, seed):
    """Each epoch `num_captions // B` batches of caption indices: `B / M` random groups, `M` items of each (distinct
    while the group has enough), one random caption of each item. Drawn in NumPy from the epoch's seed."""
    item_group = np.asarray(dataset.item_group)
    caption_item = np.asarray(dataset.caption_item)
    captioned = np.unique(caption_item)
    groups, group_of_item = np.unique(item_group[captioned], return_inverse=True)
    items_of_group = [captioned[group_of_item == g] for g in range(len(groups))]
    order = np.argsort(caption_item, kind="stable")
    starts = np.searchsorted(caption_item[order], np.arange(dataset.num_items + 1))
    per_batch = batch_size // instances
    if per_batch > len(groups):
        raise ValueError(f"instances_per_group={instances} with batch_size={batch_size} needs {per_batch} groups a "
                         f"batch; dataset {dataset.name!r} has {len(groups)}")
    num_batches = dataset.num_captions // batch_size

    def draw(epoch_seed):
        rng = np.random.default_rng([seed, int(epoch_seed) & (2**63 - 1)])
        out = np.empty((num_batches, per_batch, instances), dtype=np.int64)
        for b in range(num_batches):
            for p, g in enumerate(rng.choice(len(groups), size=per_batch, replace=False)):
                members = items_of_group[g]
                chosen = rng.permutation(members)[:instances] if len(members) >= instances else np.concatenate(
                    [rng.permutation(members), rng.choice(members, size=instances - len(members))])
                for m, item in enumerate(chosen):
                    out[b, p, m] = order[rng.integers(starts[item], starts[item + 1])]
        return out.reshape(-1)

    epoch_seeds = tf.data.Dataset.random(seed=seed + 4 * SEED_OFFSET, rerandomize_each_iteration=True)
    return epoch_seeds.take(1).map(
        lambda s: tf.ensure_shape(tf.numpy_function(draw, [s], tf.int64), [num_batches * batch_size])).unbatch()


def grouped_by_length(order, num_captions, batch_size, caption_length, bucket_width, seed, shuffle):
    """Each epoch of caption indices `order` reordered so that every `batch_size` run shares a length bucket.

    The epoch's first `num_captions // batch_size * batch_size` indices (those that fill whole batches) are sorted by
    `ceil(length / bucket_width)`, stably (so within a bucket the shuffled order stays), cut into batches, and the
    batches put in a random order drawn from the epoch's shuffle.
    """
    num_batches = num_captions // batch_size
    bucket = (caption_length + bucket_width - 1) // bucket_width

    def regroup(epoch):
        kept = epoch[:num_batches * batch_size]
        grouped = tf.gather(kept, tf.argsort(tf.gather(bucket, kept), stable=True))
        batches = tf.reshape(grouped, [num_batches, batch_size])
        if shuffle:
            batch_seed = tf.stack([tf.constant(seed + 2 * SEED_OFFSET, tf.int64), epoch[0]])
            batches = tf.random.experimental.stateless_shuffle(batches, seed=batch_seed)
        return tf.reshape(batches, [-1])

    return order.batch(num_captions).map(regroup).unbatch()
