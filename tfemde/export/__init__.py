"""Export a trained dual encoder to one self-describing folder: ONNX, SavedModel, tokenizer and manifest.

`export_run(run_dir_or_model, out_dir)` writes:

* `image.onnx`: `image [batch, H, W, 3]` float32 in [0, 1] (or `regions [batch, regions, F]` float32 +
  `region_mask [batch, regions]` bool) → `set [batch, K, D]` float32 and, with a sketch, `sketch [batch, S]`.
  Images enter as float in [0, 1], exactly what the Keras model takes: `uint8 / 255` is done by the caller
  (`tfemde.serving.Encoder.encode_images` does it in NumPy, bit-identical to the training pipeline), which keeps
  the ONNX graph and the SavedModel signature the same as the training model's input.
* `text.onnx`: `caption_ids [batch, tokens]` int32 (0 = padding) + `caption_mask [batch, tokens]` bool → `set`,
  `sketch`.
* `text_e2e.onnx`: `text [batch]` string → `set`, `sketch`, and the `token_ids [batch, tokens]` int32 /
  `token_mask` bool it tokenized to. The onnxruntime-extensions `SentencepieceTokenizer` op and a ragged → dense
  step (truncate to `max_length`, right-pad with 0 to the longest caption of the batch), built with `onnx.helper`
  and merged in front of the text encoder with `onnx.compose.merge_models`. Running it needs the
  onnxruntime-extensions op library.
* `saved_model/`: a TensorFlow SavedModel with the signatures `encode_image` and `encode_text` (same input and
  output names as the ONNX files).
* `tokenizer.model`: the SentencePiece model (the training tokenizer).
* `manifest.json`: input/output names, dtypes and shapes, K, D, the sketch size and depth, the similarity with its
  α and λ, the image preprocessing, `max_length`, package and library versions, the parity measured at export, and
  the size and sha256 of every other file.

Batch, token and region axes are dynamic. The ONNX graphs come from `tf2onnx.convert.from_function` on
`tf.function`s with named `TensorSpec`s returning dicts, so the names above are stable. Every export checks
itself before it reports success: each ONNX file runs in onnxruntime, in a TensorFlow-free subprocess (the
extensions op library crashes a process that has imported TensorFlow), against TensorFlow on two batch sizes and
two sequence lengths (max abs difference ≤ 1e-4); the SavedModel is reloaded and compared the same way;
`text_e2e.onnx` must give exactly the training tokenizer's ids; any converter ERROR or "unsupported op" fails the
export. The folder is written to a temporary path and moved into place only when all of that holds.

With `quantize=True` the folder also holds `image.int8.onnx` and `text.int8.onnx` (`tfemde.export.quantize`: int8
weights, dynamic activation quantization; about 2-3x faster per single item on a CPU). They cannot meet 1e-4, so
their check is the cosine between each of their set elements (and sketch rows) and TensorFlow's, which must be
at least `INT8_MIN_COSINE`; the measured values go into the manifest's `quantized` entry.

The package, in the order an export runs: `signatures` (the encoders as named `tf.function`s, the SavedModel),
`convert` (tf2onnx, quiet and strict), `tokenizer_graph` (the SentencePiece ONNX front of `text_e2e.onnx`),
`quantize` (the int8 graphs), `verify` (the parity checks), `describe` (the manifest), `folder` (`export_run`).
"""

from tfemde.export.convert import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportError, convert_function
from tfemde.export.folder import export_run
from tfemde.export.signatures import IMAGE_SIGNATURE, TEXT_SIGNATURE
from tfemde.export.tokenizer_graph import CONTRIB_DOMAIN, text_e2e_model, tokenizer_model
from tfemde.export.verify import INT8_MIN_COSINE, TOLERANCE

__all__ = ["CONTRIB_DOMAIN", "DEFAULT_OPSET", "ExportError", "IMAGE_SIGNATURE", "INT8_MIN_COSINE",
           "SUPPORTED_OPSETS", "TEXT_SIGNATURE", "TOLERANCE", "convert_function", "export_run", "text_e2e_model",
           "tokenizer_model"]
