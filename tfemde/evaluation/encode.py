"""Embeddings of a data set from a Keras `DualEncoder`: every item and every caption, in order.

TensorFlow is imported inside the functions, so `tfemde.evaluation` stays importable without it.
"""

from __future__ import annotations

import numpy as np

from tfemde.evaluation.metrics import _progress_bar
from tfemde.serving import Embeddings


def embeddings_from_outputs(outputs, config) -> Embeddings:
    """`Embeddings` from an encoder's `{"set", "sketch"}` outputs (NumPy arrays), using the config's sketch depth."""
    sketches = outputs.get("sketch") if config.sketch else None
    return Embeddings(np.asarray(outputs["set"], dtype=np.float32),
                      sketches=None if sketches is None else np.asarray(sketches, dtype=np.float32),
                      sketch_depth=config.sketch_depth if sketches is not None else None)


def _compiled(encoder):
    """One `tf.function` per encoder, kept on it, traced once for any batch size (the encoder's input shapes)."""
    compiled = getattr(encoder, "_tfemde_inference_fn", None)
    if compiled is None:
        import tensorflow as tf

        signature = {tensor.name: tf.TensorSpec((None,) + tuple(tensor.shape[1:]), tensor.dtype, name=tensor.name)
                     for tensor in encoder.inputs}
        compiled = tf.function(lambda inputs: encoder(inputs, training=False), input_signature=[signature])
        # TensorFlow counts the traces of every function made at this line together and warns of "frequent
        # retracing" when a few new encoders are used in a row (a run's validation, its best checkpoint, the next
        # run), though each is traced once. tf.function offers no public switch for its warning.
        compiled._omit_frequent_tracing_warning = True
        object.__setattr__(encoder, "_tfemde_inference_fn", compiled)
    return compiled


def _predict(encoder, data, config, progress, desc="encoding"):
    """Run a Keras encoder over a tf.data dataset of dict batches and return its `Embeddings`."""
    names = [tensor.name for tensor in encoder.inputs]
    run = _compiled(encoder)
    outputs = {}
    batches = data.map(lambda batch: {name: batch[name] for name in names})
    bar = _progress_bar(progress, int(batches.cardinality()) if int(batches.cardinality()) > 0 else None, desc)
    for batch in batches:
        for key, value in run(batch).items():
            outputs.setdefault(key, []).append(value.numpy())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return embeddings_from_outputs({key: np.concatenate(parts) for key, parts in outputs.items()}, config)


def encode_dataset(model, dataset, tokenizer=None, max_length=None, batch_size=256, progress=False):
    """Embeddings of every item and every caption, in order.

    Args:
        model: a `DualEncoder`.
        dataset: a `tfemde.data.Dataset` (tokenised here with `tokenizer`) or an `EvalData` from `eval_dataset`.
        tokenizer: the run's `Tokenizer` (needed for a `Dataset`).
        max_length: caption length in tokens (default: the model config's).
        batch_size: encoder batch size.
        progress: show Keras progress bars.

    Returns:
        `(items, captions)`: two `tfemde.serving.Embeddings`.
    """
    from tfemde.data import EvalData, eval_dataset

    config = model.config
    if not isinstance(dataset, EvalData):
        if tokenizer is None:
            raise ValueError("encode_dataset needs tokenizer= (the run's Tokenizer) to encode a Dataset's captions")
        image_size = config.image_size if dataset.kind == "image_files" else None
        dataset = eval_dataset(dataset, tokenizer, batch_size, max_length=max_length or config.max_length,
                               image_size=image_size)
    return (_predict(model.image_encoder, dataset.items, config, progress, "encoding items"),
            _predict(model.text_encoder, dataset.captions, config, progress, "encoding captions"))


def encode_items(model, dataset, tokenizer, batch_size=256, progress=False) -> Embeddings:
    """Embeddings of every item of a `Dataset` (images or regions), in order, from the model's image encoder."""
    from tfemde.data import eval_dataset

    config = model.config
    image_size = config.image_size if dataset.kind == "image_files" else None
    data = eval_dataset(dataset, tokenizer, batch_size, max_length=config.max_length, image_size=image_size)
    return _predict(model.image_encoder, data.items, config, progress, "encoding items")
