"""`tf.distribute` strategies for `train`: which strategy a name means and which worker writes the run folder.

With a strategy the model, its optimizer and metrics are built under `strategy.scope()`, the batch size is the
global batch (split evenly over the replicas), and the loss of every replica scores against the whole global batch
(`tfemde.layers.replicas`). Under `multi_worker` only the chief writes the run folder; the other workers write
nothing of it and read the chief's backup to resume, so the run folder must be on a file system every worker sees
when a killed run is to resume (`tfemde.training.callbacks.WorkerBackupAndRestore`). TensorFlow is imported only
when a strategy is made, so the CLI can offer the choices without it.
"""

from __future__ import annotations

import json
import os

DISTRIBUTE_CHOICES = ("none", "mirrored", "multi_worker")


def make_strategy(distribute):
    """The `tf.distribute.Strategy` that `distribute` names, or None (Keras' default, one device).

    Args:
        distribute: `None` or `"none"`; `"mirrored"` (`MirroredStrategy`: every GPU of this machine, else its CPU);
            `"multi_worker"` (`MultiWorkerMirroredStrategy` over the cluster in the `TF_CONFIG` environment
            variable; create it before any other TensorFlow work of the process); or a `tf.distribute.Strategy`.

    Returns:
        a strategy, or None for `"none"`.
    """
    import tensorflow as tf

    if distribute is None or isinstance(distribute, tf.distribute.Strategy):
        return distribute
    if distribute not in DISTRIBUTE_CHOICES:
        raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTE_CHOICES)} or a tf.distribute.Strategy; "
                         f"got {distribute!r}")
    if distribute == "none":
        return None
    if distribute == "mirrored":
        return tf.distribute.MirroredStrategy()
    cluster = _tf_config().get("cluster")
    if not cluster:
        raise ValueError("distribute='multi_worker' needs the cluster in the TF_CONFIG environment variable, e.g. "
                         '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", '
                         '"index": 0}}; got ' + (repr(os.environ["TF_CONFIG"]) if "TF_CONFIG" in os.environ
                                                 else "no TF_CONFIG"))
    return tf.distribute.MultiWorkerMirroredStrategy()


def _tf_config() -> dict:
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG must be JSON with 'cluster' and 'task'; got {text!r} ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object with 'cluster' and 'task'; got {text!r}")
    return config


def gpus_present() -> bool:
    """Whether TensorFlow sees a GPU (where `train` defaults to mixed precision)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def is_chief(strategy) -> bool:
    """Whether this process writes the run folder: always without a cluster; the `chief` task, or worker 0 of a
    cluster without one (TensorFlow's convention)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if strategy is None or resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def num_replicas(strategy) -> int:
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)
