"""The two encoders as `tf.function`s with named inputs and dict outputs, and the SavedModel that holds both.

The input `TensorSpec` names (`image` or `regions` + `region_mask`; `caption_ids` + `caption_mask`) and the
output keys (`set`, `sketch`) become the ONNX graphs' and the SavedModel signatures' names.
"""

from __future__ import annotations

from pathlib import Path

from tfemde.export.convert import _quiet_converter

IMAGE_SIGNATURE = "encode_image"
TEXT_SIGNATURE = "encode_text"


def _specs(config):
    """`(image_specs, text_specs, dims)`: named TensorSpecs and the name of every dynamic axis."""
    import tensorflow as tf

    if config.image_input == "regions":
        image = [tf.TensorSpec([None, None, config.region_dim], tf.float32, name="regions"),
                 tf.TensorSpec([None, None], tf.bool, name="region_mask")]
    else:
        image = [tf.TensorSpec([None, config.image_size, config.image_size, 3], tf.float32, name="image")]
    text = [tf.TensorSpec([None, None], tf.int32, name="caption_ids"),
            tf.TensorSpec([None, None], tf.bool, name="caption_mask")]
    dims = {"image": ["batch", None, None, None], "regions": ["batch", "regions", None],
            "region_mask": ["batch", "regions"], "caption_ids": ["batch", "tokens"],
            "caption_mask": ["batch", "tokens"], "set": ["batch", None, None], "sketch": ["batch", None],
            "text": ["batch"], "token_ids": ["batch", "tokens"], "token_mask": ["batch", "tokens"]}
    return image, text, dims


def _functions(model, config):
    """`tf.function`s of the two encoders with named inputs and dict outputs (`set`, `sketch`), inference mode."""
    import tensorflow as tf

    image_specs, text_specs, _ = _specs(config)
    image_encoder, text_encoder = model.image_encoder, model.text_encoder

    def outputs(result):
        out = {"set": tf.cast(result["set"], tf.float32)}
        if config.sketch:
            out["sketch"] = tf.cast(result["sketch"], tf.float32)
        return out

    if config.image_input == "regions":
        def encode_image(regions, region_mask):
            return outputs(image_encoder({"regions": regions, "region_mask": region_mask}, training=False))
    else:
        def encode_image(image):
            return outputs(image_encoder({"image": image}, training=False))

    def encode_text(caption_ids, caption_mask):
        return outputs(text_encoder({"caption_ids": caption_ids, "caption_mask": caption_mask}, training=False))

    return (tf.function(encode_image, input_signature=image_specs),
            tf.function(encode_text, input_signature=text_specs))


def _save_saved_model(path: Path, model, image_fn, text_fn, image_specs, text_specs):
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model.image_encoder)
    archive.track(model.text_encoder)
    archive.add_endpoint(IMAGE_SIGNATURE, image_fn, input_signature=image_specs)
    archive.add_endpoint(TEXT_SIGNATURE, text_fn, input_signature=text_specs)
    with _quiet_converter():
        archive.write_out(str(path), verbose=False)
