"""The global batch under `tf.distribute`: every replica's loss sees the embeddings and ids of all replicas.

A contrastive loss on R replicas must score each image against the captions of the whole global batch, not only
its own replica's: negatives are what it learns from. `gather_global_batch` concatenates each `[b, ...]` tensor of a
replica with those of the other replicas, in replica order, with a gradient: TensorFlow's `all_gather` sums the
upstream gradients over the replicas and gives each replica its own rows back (compare open_clip's
`gather_with_grad`). Every replica then computes the loss of the global batch, `L`, and returns `L / R`; the
strategy's sum of the replicas' weight gradients is exactly the gradient of `L` (tests/test_distribute.py checks it
against one device).
"""

from __future__ import annotations


def replica_context():
    """The current replica context of a strategy with more than one replica, else None."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def placed(value, context):
    """`value` with a device of this replica. With one device a worker, MultiWorkerMirroredStrategy traces the step
    without device scopes, and TensorFlow 2.21's collectives then fail with "destinations can not be empty"."""
    import tensorflow as tf

    value = tf.convert_to_tensor(value)
    if value.device:
        return value
    with tf.device(context.strategy.extended.worker_devices[0]):
        return tf.identity(value)


def gather_global_batch(values: dict) -> dict:
    """Each tensor `[b, ...]` of `values` as the global batch `[R·b, ...]`, this replica's rows where they were.

    Outside a replica context (no strategy, one replica, or Keras building the model symbolically in the
    cross-replica context) the values come back unchanged. `None` values stay `None`.

    Args:
        values: a dict of tensors whose first axis is the per-replica batch (embeddings, ids).

    Returns:
        a dict with the same keys and the gathered tensors.
    """
    context = replica_context()
    if context is None:
        return dict(values)
    # One collective per tensor: TensorFlow 2.21 packs a list into one concat (one dtype only) and its gradient
    # stacks the list's gradients (one shape only).
    return {name: None if value is None else context.all_gather(placed(value, context), axis=0)
            for name, value in values.items()}


def scale_for_replicas(loss):
    """`loss / R` in a replica context, so that the sum over replicas of the gradients is that of `loss`."""
    context = replica_context()
    if context is None:
        return loss
    return loss * (1.0 / context.num_replicas_in_sync)


def in_multi_worker_mode() -> bool:
    """Whether the strategy in scope is a MultiWorkerMirroredStrategy spanning more than one worker."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and bool(strategy.extended._in_multi_worker_mode()))
