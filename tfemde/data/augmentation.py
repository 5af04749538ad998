"""The papers' training augmentations (VSE∞ / DivE), as TensorFlow ops on a batch, drawn from stateless random ops
seeded per batch (`tfemde.data.pipelines.train_dataset` applies them; `NO_AUGMENTATION` turns them all off).

* region drop (VSE∞ / DivE size augmentation): each region is dropped with probability `region_drop` by clearing its
  `region_mask` entry; if every region of an item would be dropped, the one with the largest draw is kept;
* caption augmentation (VSE∞ / DivE, p = `caption_augment`): each token is selected with probability p; of the
  selected tokens 50% become `tokenizer.mask_id` (the `<mask>` control id, which text never encodes to), 10% become a
  random ordinary token, 40% are deleted (later tokens move up, so a caption longer than `max_length` fills the
  freed places). If every token of a caption would be deleted, none of its tokens is deleted;
* image augmentation: a random square-ish crop keeping a side fraction in [`crop_scale`, 1] of each side, resized back
  to the image size, and, if `flip`, a horizontal flip with probability 0.5.
"""

from __future__ import annotations

import tensorflow as tf

# `train_dataset` keywords that turn off every augmentation (its defaults are the papers'): the pairs as they are.
NO_AUGMENTATION = {"caption_augment": 0.0, "image_augment": False, "region_drop": 0.0}


def augment_captions(tokens, seed, p, mask_id, normal_ids):
    """`tokens` (ragged `[B, None]`) with each token masked (50%), replaced (10%) or deleted (40%) with probability
    `p`, as the module docstring says."""
    flat = tokens.flat_values
    n = tf.shape(flat)[0]
    select = tf.random.stateless_uniform([n], seed=seed) < p
    kind = tf.random.stateless_uniform([n], seed=seed + [0, 1])
    pick = tf.random.stateless_uniform([n], seed=seed + [0, 2], maxval=tf.shape(normal_ids)[0], dtype=tf.int32)
    masked = select & (kind < 0.5)
    replaced = select & (kind >= 0.5) & (kind < 0.6)
    deleted = select & (kind >= 0.6)
    new = tf.where(masked, tf.cast(mask_id, flat.dtype), tf.where(replaced, tf.gather(normal_ids, pick), flat))
    keep = ~deleted
    kept_per_row = tf.math.unsorted_segment_sum(tf.cast(keep, tf.int32), tokens.value_rowids(), tokens.nrows())
    keep = keep | tf.gather(kept_per_row == 0, tokens.value_rowids())
    return tf.ragged.boolean_mask(tokens.with_flat_values(new), tokens.with_flat_values(keep))


def region_drop_mask(batch, num_regions, seed, p):
    """`[B, R]` bool: each region kept with probability 1 - p, at least one per row."""
    u = tf.random.stateless_uniform([batch, num_regions], seed=seed)
    keep = u >= p
    none_kept = ~tf.reduce_any(keep, axis=1, keepdims=True)
    best = tf.one_hot(tf.argmax(u, axis=1), num_regions, on_value=True, off_value=False)
    return keep | (none_kept & best)


def augment_images(images, seed, crop_scale, flip):
    """Random crop (side fraction in [crop_scale, 1], resized back) and horizontal flip of `[B, H, W, 3]` uint8.

    Both are one `crop_and_resize`: a flipped image is a crop box whose x1 > x2. A full, unflipped box samples
    exactly the original pixels.
    """
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    side = tf.random.stateless_uniform([batch], seed=seed, minval=crop_scale, maxval=1.0)
    if crop_scale >= 1.0:
        side = tf.ones([batch])
    offset = tf.random.stateless_uniform([batch, 2], seed=seed + [0, 1]) * (1.0 - side)[:, None]
    x1, x2 = offset[:, 1], offset[:, 1] + side
    if flip:
        flipped = tf.random.stateless_uniform([batch], seed=seed + [0, 2]) < 0.5
        x1, x2 = tf.where(flipped, x2, x1), tf.where(flipped, x1, x2)
    boxes = tf.stack([offset[:, 0], x1, offset[:, 0] + side, x2], axis=1)
    # float32 input: crop_and_resize is about 2x slower on uint8 input
    x = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(batch), [height, width],
                                 method="bilinear")
    return tf.clip_by_value(x * (1.0 / 255.0), 0.0, 1.0)
