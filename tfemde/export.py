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

With `quantize=True` the folder also holds `image.int8.onnx` and `text.int8.onnx` (`tfemde.quantize`: int8
weights, dynamic activation quantization; about 2-3x faster per single item on a CPU). They cannot meet 1e-4, so
their check is the cosine between each of their set elements (and sketch rows) and TensorFlow's, which must be
at least `INT8_MIN_COSINE`; the measured values go into the manifest's `quantized` entry.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tfemde.quantize import METHOD as QUANTIZATION_METHOD
from tfemde.quantize import inline_loop_weights, int8_name, quantize_int8
from tfemde.serving import manifest as mf

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = tuple(range(13, 19))  # tf2onnx 1.17 stops at 18
TOLERANCE = 1e-4
INT8_MIN_COSINE = 0.99
CONTRIB_DOMAIN = "ai.onnx.contrib"
IMAGE_SIGNATURE = "encode_image"
TEXT_SIGNATURE = "encode_text"
_VERSIONED_PACKAGES = ("tfemde", "tensorflow", "keras", "tensorflow-text", "tf2onnx", "onnx", "onnxruntime",
                       "onnxruntime-extensions", "sentencepiece", "numpy", "protobuf", "pillow")
_TOKENIZER_PREFIX = "tokenizer/"
# Strings the text_e2e parity check always includes (normalisation, empty, whitespace, scripts, emoji).
_CHECK_TEXTS = ["", "  \t ", "A dog runs on the beach.", "CAFÉ naïve ﬁne ＦＵＬＬ", "猫 😀 👍🏽 мир", "<mask> <pad>"]


class ExportError(RuntimeError):
    """The export could not be converted or failed its own checks; nothing was written to the output folder."""


# ---------------------------------------------------------------------------------------------- inputs
def _resolve(run_dir_or_model, tokenizer):
    """`(model, config, tokenizer, source)` from a run folder, an opened `Run`, or a `DualEncoder` + tokenizer."""
    from tfemde.text import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.load(tokenizer)
    elif tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"tokenizer must be a tfemde.text.Tokenizer, a .model path or None; got "
                         f"{type(tokenizer).__name__}")
    source = None
    if isinstance(run_dir_or_model, (str, os.PathLike)):
        from tfemde.run_folder import open_run

        run_dir_or_model = open_run(run_dir_or_model)
    if all(hasattr(run_dir_or_model, a) for a in ("path", "config", "tokenizer", "model")):  # a Run
        run = run_dir_or_model
        source = str(run.path)
        model, tokenizer = run.model, tokenizer or run.tokenizer
        config = getattr(model, "config", None) or run.config  # what the saved model was built with
    else:
        model = run_dir_or_model
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "image_encoder") or not hasattr(model, "text_encoder"):
            raise ValueError("run_dir_or_model must be a run folder, a tfemde.runs.Run or a tfemde DualEncoder; got "
                             f"{type(model).__name__}")
        if tokenizer is None:
            raise ValueError("exporting a model (not a run folder) needs tokenizer=: its training Tokenizer or "
                             "tokenizer.model path")
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds only config.vocab_size="
                         f"{config.vocab_size}; they do not belong together")
    return model, config, tokenizer, source


def _check_out_dir(out_dir: Path):
    """Refuse an `out_dir` that is a file, or a non-empty folder that is not exactly a complete tfemde export.

    An existing export is replaced as a whole, so it must hold nothing but what its manifest lists: a folder with a
    stray `manifest.json` and a user's files beside it is refused, never deleted.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    refuse = (f"out_dir {str(out_dir)!r} exists, is not empty and is not a tfemde export ({{}}); choose another "
              "folder (an existing export is replaced)")
    try:
        manifest = mf.read_manifest(out_dir)
    except mf.ExportFileError as error:
        raise ValueError(refuse.format(error)) from None
    listed = set(manifest["files"]) | {mf.MANIFEST_NAME}
    folders = {parent.as_posix() for name in listed for parent in Path(name).parents if parent != Path(".")}
    for path in sorted(out_dir.rglob("*")):
        name = path.relative_to(out_dir).as_posix()
        # A folder is the export's when a listed file is below it, or it sits inside one (saved_model/assets/).
        ours = name in folders or (path.parent != out_dir and path.parent.relative_to(out_dir).as_posix() in folders)
        if path.is_symlink() or (path.is_dir() and not ours) or (not path.is_dir() and name not in listed):
            raise ValueError(refuse.format(f"{name!r} is not a file of its manifest"))


# ---------------------------------------------------------------------------------------------- signatures
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


# ---------------------------------------------------------------------------------------------- conversion
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _quiet_converter():
    """Silence tf2onnx's (and TensorFlow's Python) logging; yield the tf2onnx records at WARNING and above."""
    import tensorflow as tf

    handler = _Collect()
    loggers = [logging.getLogger("tf2onnx"), tf.get_logger()]
    saved = [(lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    try:
        for lg in loggers:
            lg.handlers = []
            lg.propagate = False
        loggers[0].setLevel(logging.WARNING)
        loggers[0].addHandler(handler)
        loggers[1].setLevel(logging.ERROR)
        yield handler.records
    finally:
        for lg, (level, propagate, handlers) in zip(loggers, saved):
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers = handlers


# tf2onnx 1.17's ReshapeOptimizer rewrites `Shape(Reshape(MatMul(Reshape(x)), s))` into the shape of the inner 2-D
# MatMul, so `ops.reshape(y, (ops.shape(y)[0], ops.shape(y)[1], heads, dim))` after a `[B, L, D] @ [D, E]` matmul
# (Keras lowers it to reshape -> MatMul -> reshape) fails in onnxruntime ("input tensor cannot be reshaped").
# Skipping that one optimizer keeps the other tf2onnx optimizations and converts such graphs correctly.
_SKIPPED_OPTIMIZERS = ("reshape_optimizer",)


@contextlib.contextmanager
def _without_optimizers(names=_SKIPPED_OPTIMIZERS):
    try:
        from tf2onnx import optimizer
    except ImportError:  # pragma: no cover - tf2onnx is a training-side dependency
        yield
        return
    registry = getattr(optimizer, "_optimizers", None)
    if not isinstance(registry, dict):
        yield
        return
    saved = list(registry.items())
    try:
        for name in names:
            registry.pop(name, None)
        yield
    finally:
        registry.clear()
        registry.update(saved)


def convert_function(fn, input_signature, opset: int = DEFAULT_OPSET, dims=None, what: str = "model"):
    """Convert a `tf.function` to an ONNX `ModelProto` with tf2onnx, failing on anything the converter could not map.

    Args:
        fn: a `tf.function` taking the named tensors of `input_signature` and returning a dict (its keys become
            the ONNX output names).
        input_signature: named `tf.TensorSpec`s (their names become the ONNX input names).
        opset: the ONNX opset (13 to 18).
        dims: optional `{input or output name: [axis names]}`: dynamic axes get these names (None keeps one).
        what: a name for error messages.

    Returns:
        The checked `onnx.ModelProto`.

    Raises:
        ExportError: tf2onnx logged an ERROR or an unsupported op, left a non-ONNX op in the graph, or the graph
            fails `onnx.checker`.
    """
    import onnx
    import tf2onnx

    with _quiet_converter() as records, _without_optimizers():
        try:
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=input_signature, opset=opset)
        except Exception as error:  # noqa: BLE001 - any converter failure is an export failure
            raise ExportError(f"tf2onnx could not convert the {what}: {type(error).__name__}: {error}") from error
    problems = [r.getMessage() for r in records
                if r.levelno >= logging.ERROR or "unsupported" in r.getMessage().lower()]
    if problems:
        raise ExportError(f"tf2onnx could not fully convert the {what}: " + " | ".join(problems[:5]))
    foreign = sorted({f"{n.domain}:{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"the converted {what} contains non-ONNX ops: {', '.join(foreign)}")
    try:
        onnx.checker.check_model(proto)
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"the converted {what} is not a valid ONNX graph: {error}") from error
    if dims:
        _name_dims(proto, dims)
    return proto


def _name_dims(proto, dims):
    """Give the dynamic axes of the graph inputs and outputs readable names (`batch`, `tokens`, `regions`)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        names = dims.get(value.name)
        if not names:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis < len(names) and names[axis] and not dim.HasField("dim_value"):
                dim.dim_param = names[axis]


def tokenizer_model(model_proto: bytes, max_length: int, opset: int = DEFAULT_OPSET, ir_version=None,
                    prefix: str = ""):
    """An ONNX graph from strings to padded SentencePiece ids: the front of `text_e2e.onnx`.

    The onnxruntime-extensions `SentencepieceTokenizer` op (the `.model` bytes as its `model` attribute; the six
    sampling/control inputs fed as constants: no sampling, no BOS/EOS, no reversal) gives ragged ids as
    `tokens` + row splits; plain ONNX ops then truncate each row to `max_length` and right-pad with 0 to the
    longest row of the batch (at least one column).

    Args:
        model_proto: the SentencePiece model bytes (`Tokenizer.model_proto`).
        max_length: T, the longest caption kept (in ids).
        opset: the default-domain opset.
        ir_version: the ONNX IR version to stamp (to match a graph it is merged with); None for onnx's default.
        prefix: prepended to every internal and output name.

    Returns:
        An `onnx.ModelProto` with input `text [batch]` string and outputs `{prefix}ids [batch, tokens]` int32 and
        `{prefix}mask [batch, tokens]` bool, `tokens = max(1, min(max_length, longest caption))`.

    Example:
        >>> from tfemde.text import Tokenizer
        >>> tok = Tokenizer.train(["a red apple", "a green pear"] * 10, vocab_size=15)
        >>> graph = tokenizer_model(tok.model_proto, max_length=8)
        >>> [o.name for o in graph.graph.output]
        ['ids', 'mask']
    """
    from onnx import TensorProto, helper, numpy_helper

    max_length = int(max_length)
    if max_length < 1:
        raise ValueError(f"max_length must be a positive int; got {max_length}")
    p = prefix

    def const(name, value, dtype):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name=p + name)

    initializers = [
        const("nbest_size", [0], np.int64), const("alpha", [0.0], np.float32), const("add_bos", [False], bool),
        const("add_eos", [False], bool), const("reverse", [False], bool), const("fairseq", [False], bool),
        const("zero_token", [0], np.int32), const("zero", [0], np.int64), const("one", [1], np.int64),
        const("minus_one", [-1], np.int64), const("end", [np.iinfo(np.int64).max], np.int64),
        const("max_length", [max_length], np.int64), const("zero_scalar", 0, np.int64),
        const("one_scalar", 1, np.int64),
    ]
    nodes = [
        helper.make_node("SentencepieceTokenizer",
                         ["text"] + [p + n for n in ("nbest_size", "alpha", "add_bos", "add_eos", "reverse",
                                                     "fairseq")],
                         [p + "tokens", p + "row_splits", p + "token_offsets"], domain=CONTRIB_DOMAIN,
                         model=bytes(model_proto), name=p + "sentencepiece"),
        helper.make_node("Slice", [p + "row_splits", p + "zero", p + "minus_one"], [p + "starts"]),
        helper.make_node("Slice", [p + "row_splits", p + "one", p + "end"], [p + "ends"]),
        helper.make_node("Sub", [p + "ends", p + "starts"], [p + "lengths"]),
        helper.make_node("Min", [p + "lengths", p + "max_length"], [p + "kept"]),
        helper.make_node("ReduceMax", [p + "kept"], [p + "longest"], keepdims=1),
        helper.make_node("Max", [p + "longest", p + "one"], [p + "width"]),
        helper.make_node("Squeeze", [p + "width"], [p + "width_scalar"]),
        helper.make_node("Range", [p + "zero_scalar", p + "width_scalar", p + "one_scalar"], [p + "positions"]),
        helper.make_node("Unsqueeze", [p + "positions", p + "zero"], [p + "positions_row"]),
        helper.make_node("Unsqueeze", [p + "kept", p + "one"], [p + "kept_column"]),
        helper.make_node("Unsqueeze", [p + "starts", p + "one"], [p + "starts_column"]),
        helper.make_node("Less", [p + "positions_row", p + "kept_column"], [p + "mask"]),
        helper.make_node("Add", [p + "starts_column", p + "positions_row"], [p + "index"]),
        # Padded positions read one extra 0 appended after the last token (also when there are no tokens).
        helper.make_node("Shape", [p + "tokens"], [p + "num_tokens"]),
        helper.make_node("Where", [p + "mask", p + "index", p + "num_tokens"], [p + "safe_index"]),
        helper.make_node("Concat", [p + "tokens", p + "zero_token"], [p + "tokens_and_pad"], axis=0),
        helper.make_node("Gather", [p + "tokens_and_pad", p + "safe_index"], [p + "ids"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "sentencepiece_tokenizer",
        inputs=[helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        outputs=[helper.make_tensor_value_info(p + "ids", TensorProto.INT32, ["batch", "tokens"]),
                 helper.make_tensor_value_info(p + "mask", TensorProto.BOOL, ["batch", "tokens"])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(CONTRIB_DOMAIN, 1)],
                              producer_name="tfemde")
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def text_e2e_model(text_proto, model_proto: bytes, max_length: int, opset: int = DEFAULT_OPSET):
    """`tokenizer_model` merged in front of the text encoder graph: strings in, set (+ sketch) and ids out."""
    import onnx
    from onnx import helper

    pre = tokenizer_model(model_proto, max_length, opset=opset, ir_version=text_proto.ir_version,
                          prefix=_TOKENIZER_PREFIX)
    # The ids and mask also leave the graph (as token_ids / token_mask) so callers can see what was encoded.
    pre.graph.node.extend([helper.make_node("Identity", [_TOKENIZER_PREFIX + "ids"], ["token_ids"]),
                           helper.make_node("Identity", [_TOKENIZER_PREFIX + "mask"], ["token_mask"])])
    pre.graph.output.extend([helper.make_tensor_value_info("token_ids", onnx.TensorProto.INT32, ["batch", "tokens"]),
                             helper.make_tensor_value_info("token_mask", onnx.TensorProto.BOOL,
                                                           ["batch", "tokens"])])
    encoder_outputs = [o.name for o in text_proto.graph.output]
    merged = onnx.compose.merge_models(
        pre, text_proto,
        io_map=[(_TOKENIZER_PREFIX + "ids", "caption_ids"), (_TOKENIZER_PREFIX + "mask", "caption_mask")],
        outputs=encoder_outputs + ["token_ids", "token_mask"], name="text_e2e", producer_name="tfemde")
    order = encoder_outputs + ["token_ids", "token_mask"]
    outputs = sorted(merged.graph.output, key=lambda o: order.index(o.name))
    del merged.graph.output[:]
    merged.graph.output.extend(outputs)
    try:
        onnx.checker.check_model(merged)
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"the merged text_e2e graph is not a valid ONNX graph: {error}") from error
    return merged


# ---------------------------------------------------------------------------------------------- checks
def _check_inputs(config, tokenizer, rng):
    """The TF/ORT comparison cases: two batch sizes × two sequence lengths per encoder, and strings for e2e."""
    max_length = config.max_length
    vocab = min(config.vocab_size, tokenizer.vocab_size)
    text = []
    for batch, length in ((1, min(3, max_length)), (3, max_length)):
        lengths = rng.integers(1, length + 1, size=batch)
        lengths[0] = length
        if batch > 2:
            lengths[-1] = 0  # a caption with no token at all must work too
        mask = np.arange(length)[None, :] < lengths[:, None]
        ids = np.where(mask, rng.integers(1, vocab, size=(batch, length)), 0).astype(np.int32)
        text.append({"caption_ids": ids, "caption_mask": mask})
    image = []
    if config.image_input == "regions":
        for batch, count in ((1, config.num_regions), (3, max(1, config.num_regions // 2 + 1))):
            mask = rng.random((batch, count)) < 0.8
            mask[:, 0] = True
            image.append({"regions": rng.normal(size=(batch, count, config.region_dim)).astype(np.float32),
                          "region_mask": mask})
    else:
        size = config.image_size
        for batch in (1, 3):
            image.append({"image": rng.random((batch, size, size, 3), dtype=np.float32)})
    normal = tokenizer.normal_ids
    long_text = tokenizer.decode(rng.choice(normal, size=(1, 2 * max_length + 3)))[0]
    short_text = tokenizer.decode(rng.choice(normal, size=(1, 3)))[0]
    strings = [[short_text], _CHECK_TEXTS + [long_text]]
    return image, text, strings


def _max_diff(got: dict, want: dict, what: str) -> float:
    worst = 0.0
    for name, value in want.items():
        if name not in got:
            raise ExportError(f"{what} has no output {name!r}; it has {sorted(got)}")
        if got[name].shape != value.shape:
            raise ExportError(f"{what} output {name!r} has shape {got[name].shape}; TensorFlow gives {value.shape}")
        if not np.isfinite(got[name]).all():
            raise ExportError(f"{what} output {name!r} is not finite")
        worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - value))) if value.size else 0.0)
    return worst


def _run_onnx_subprocess(folder: Path, cases) -> list:
    """Run ONNX cases `[(file, feeds, custom_ops)]` in a TensorFlow-free Python; returns their output dicts."""
    with tempfile.TemporaryDirectory(prefix="tfemde-check-") as work:
        work = Path(work)
        job = []
        for i, (name, feeds, custom_ops) in enumerate(cases):
            np.savez(work / f"feeds_{i}.npz", **feeds)
            job.append({"model": str(folder / name), "feeds": f"feeds_{i}.npz", "outputs": f"outputs_{i}.npz",
                        "custom_ops": custom_ops})
        (work / "job.json").write_text(json.dumps(job))
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        done = subprocess.run([sys.executable, "-m", "tfemde.serving._onnx_worker", str(work)], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ExportError("onnxruntime could not run the exported graphs (TensorFlow-free check, exit code "
                              f"{done.returncode}): " + " | ".join(tail))
        results = []
        for entry in job:
            with np.load(work / entry["outputs"], allow_pickle=False) as z:
                results.append({k: z[k] for k in z.files})
        return results


def _min_cosine(got: dict, want: dict, sketch_depth) -> float:
    """The smallest cosine between matching set elements `[N, K, D]` and sketch rows of two output dicts."""
    pairs = [(got["set"], want["set"])]
    if "sketch" in want and sketch_depth:
        pairs.append((got["sketch"].reshape(len(got["sketch"]), sketch_depth, -1),
                      want["sketch"].reshape(len(want["sketch"]), sketch_depth, -1)))
    worst = 1.0
    for a, b in pairs:
        a, b = a.astype(np.float64), b.astype(np.float64)
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        valid = norms > 1e-12
        if valid.any():
            worst = min(worst, float(((a * b).sum(-1)[valid] / norms[valid]).min()))
    return worst


def _verify(folder: Path, image_fn, text_fn, config, tokenizer, seed: int = 0, quantized: bool = False) -> dict:
    """Compare ONNX (onnxruntime, subprocess) and the reloaded SavedModel with TensorFlow; raise on any mismatch."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    image_cases, text_cases, string_cases = _check_inputs(config, tokenizer, rng)

    def reference(fn, feeds):
        return {k: v.numpy().astype(np.float64) for k, v in fn(**feeds).items()}

    onnx_cases, wants = [], []
    for feeds in image_cases:
        onnx_cases.append((mf.IMAGE_ONNX, feeds, False))
        wants.append(reference(image_fn, feeds))
    for feeds in text_cases:
        onnx_cases.append((mf.TEXT_ONNX, feeds, False))
        wants.append(reference(text_fn, feeds))
    expected_ids = []
    for texts in string_cases:
        ids, mask = tokenizer.encode(texts, config.max_length)
        width = max(1, int(mask.sum(axis=1).max()))
        ids, mask = ids[:, :width], mask[:, :width]
        expected_ids.append((ids, mask))
        onnx_cases.append((mf.TEXT_E2E_ONNX, {"text": np.array(texts, dtype=str)}, True))
        wants.append(reference(text_fn, {"caption_ids": ids, "caption_mask": mask}))
    int8_cases = []
    if quantized:
        for name, feeds, want in zip([mf.IMAGE_ONNX] * len(image_cases) + [mf.TEXT_ONNX] * len(text_cases),
                                     image_cases + text_cases, wants):
            int8_cases.append((int8_name(name), feeds, False))
            wants.append(want)

    got = _run_onnx_subprocess(folder, onnx_cases + int8_cases)
    int8_got, got = got[len(onnx_cases):], got[:len(onnx_cases)]
    diffs = {mf.IMAGE_ONNX: 0.0, mf.TEXT_ONNX: 0.0, mf.TEXT_E2E_ONNX: 0.0, mf.SAVED_MODEL_DIR: 0.0}
    e2e = 0
    for (name, feeds, _), result, want in zip(onnx_cases, got, wants):
        if name == mf.TEXT_E2E_ONNX:
            ids, mask = expected_ids[e2e]
            e2e += 1
            if result["token_ids"].shape != ids.shape or not np.array_equal(result["token_ids"], ids) \
                    or not np.array_equal(result["token_mask"], mask):
                raise ExportError(f"{mf.TEXT_E2E_ONNX} tokenizes differently from the training tokenizer: ids "
                                  f"{result['token_ids'].tolist()} vs {ids.tolist()}")
        diffs[name] = max(diffs[name], _max_diff(result, want, name))

    loaded = tf.saved_model.load(str(folder / mf.SAVED_MODEL_DIR))
    for signature, cases in ((IMAGE_SIGNATURE, image_cases), (TEXT_SIGNATURE, text_cases)):
        fn = loaded.signatures[signature]
        for feeds in cases:
            out = {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}
            want = reference(image_fn if signature == IMAGE_SIGNATURE else text_fn, feeds)
            diffs[mf.SAVED_MODEL_DIR] = max(diffs[mf.SAVED_MODEL_DIR],
                                            _max_diff(out, want, f"SavedModel signature {signature!r}"))
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    if bad:
        raise ExportError("the export differs from TensorFlow by more than "
                          f"{TOLERANCE:g}: " + ", ".join(f"{k}: {v:.3g}" for k, v in bad.items()))
    int8 = {}
    for (name, _, _), result, want in zip(int8_cases, int8_got, wants[len(onnx_cases):]):
        diff = _max_diff(result, want, name)  # also checks names, shapes, finiteness
        record = int8.setdefault(name, {"min_cosine": 1.0, "max_abs_diff": 0.0})
        record["min_cosine"] = min(record["min_cosine"], _min_cosine(result, want, config.sketch_depth
                                                                     if config.sketch else None))
        record["max_abs_diff"] = max(record["max_abs_diff"], diff)
    low = {k: v["min_cosine"] for k, v in int8.items() if not v["min_cosine"] >= INT8_MIN_COSINE}
    if low:
        raise ExportError(f"the int8 graphs are too far from TensorFlow (cosine below {INT8_MIN_COSINE}): "
                          + ", ".join(f"{k}: {v:.4f}" for k, v in low.items()))
    cases = {"image": [{k: list(v.shape) for k, v in c.items()} for c in image_cases],
             "text": [{k: list(v.shape) for k, v in c.items()} for c in text_cases],
             "text_e2e": [len(s) for s in string_cases]}
    out = {"tolerance": TOLERANCE, "max_abs_diff": diffs, "token_ids_equal": True, "cases": cases,
           "onnxruntime": "CPUExecutionProvider, TensorFlow-free subprocess"}
    if quantized:
        out["int8"] = {"min_cosine_required": INT8_MIN_COSINE, **int8}
    return out


# ---------------------------------------------------------------------------------------------- manifest
def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _io(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


def _normalization(model_proto: bytes) -> str:
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(model_proto)
    return m.normalizer_spec.name


def _dumps(manifest: dict) -> str:
    """Indented JSON with the short lists of scalars (shapes, sizes) kept on one line."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    return re.sub(r"\[\s*\n\s*([^\[\]{}]*?)\s*\n\s*\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]",
                  text) + "\n"


def _manifest(config, tokenizer, opset, verification, source) -> dict:
    manifest = _base_manifest(config, tokenizer, opset, verification, source)
    if "int8" in verification:
        manifest["quantized"] = {
            "method": QUANTIZATION_METHOD,
            "image": {"file": int8_name(mf.IMAGE_ONNX), "of": mf.IMAGE_ONNX,
                      **verification["int8"][int8_name(mf.IMAGE_ONNX)]},
            "text": {"file": int8_name(mf.TEXT_ONNX), "of": mf.TEXT_ONNX,
                     **verification["int8"][int8_name(mf.TEXT_ONNX)]},
        }
    return manifest


def _base_manifest(config, tokenizer, opset, verification, source) -> dict:
    k, d = config.set_size, config.embed_dim
    outputs = [_io("set", "float32", ["batch", k, d])]
    if config.sketch:
        outputs.append(_io("sketch", "float32", ["batch", config.sketch_size]))
    if config.image_input == "regions":
        image_inputs = [_io("regions", "float32", ["batch", "regions", config.region_dim]),
                        _io("region_mask", "bool", ["batch", "regions"])]
        image = {"input": "regions", "num_regions": config.num_regions, "region_dim": config.region_dim,
                 "preprocessing": "precomputed region features [regions, region_dim] float32 (e.g. bottom-up "
                                  "attention); region_mask True at valid regions; any number of regions"}
    else:
        size = config.image_size
        image_inputs = [_io("image", "float32", ["batch", size, size, 3])]
        image = {"input": config.image_input, "size": [size, size], "channels": "RGB", "dtype": "float32",
                 "range": [0.0, 1.0], "backbone": config.backbone,
                 "preprocessing": "decode (PNG transparency composited over white; other formats to RGB); resize "
                                  f"to {size}x{size} (squashed, aspect ratio not kept) with bilinear interpolation, "
                                  "antialiased when downsampling; round half to even and clip to uint8; divide "
                                  "by 255 to float32 in [0, 1]. The ONNX and SavedModel inputs take the float "
                                  "image; tfemde.serving.Encoder.encode_images takes uint8 arrays or files."}
    text_inputs = [_io("caption_ids", "int32", ["batch", "tokens"]), _io("caption_mask", "bool", ["batch", "tokens"])]
    token_outputs = [_io("token_ids", "int32", ["batch", "tokens"]), _io("token_mask", "bool", ["batch", "tokens"])]
    sketch_weight = float(config.sketch_weight) if config.sketch else 0.0
    return {
        "format": mf.FORMAT_NAME,
        "version": mf.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "opset": opset,
        "preset": config.preset,
        "config": config.to_dict(),
        "embedding": {"set_size": k, "dim": d, "sketch": bool(config.sketch),
                      "sketch_size": config.sketch_size, "sketch_depth": config.sketch_depth if config.sketch else None,
                      "sketch_bits": config.sketch_bits if config.sketch else None,
                      "normalized": "every set element has unit L2 norm; each of the sketch_depth rows of the "
                                    "sketch [sketch_depth, 2**sketch_bits] too"},
        "similarity": {
            "name": "smooth_chamfer+sketch" if config.sketch else "smooth_chamfer",
            "alpha": float(config.alpha), "sketch_weight": sketch_weight,
            "formula": "s(X, Y) = 1/(2α|X|) Σ_x log Σ_y exp(α<x,y>) + 1/(2α|Y|) Σ_y log Σ_x exp(α<x,y>) "
                       "+ sketch_weight · <sketch_x, sketch_y> / sketch_depth",
            "implementation": "tfemde.serving.similarity",
        },
        "image": image,
        "text": {"max_length": config.max_length, "tokenizer": mf.TOKENIZER_FILE, "type": "sentencepiece",
                 "vocab_size": tokenizer.vocab_size, "pad_id": 0, "normalization": _normalization(
                     tokenizer.model_proto),
                 "truncation": "keep the first max_length ids",
                 "padding": "right, with id 0 and caption_mask False; text_e2e.onnx and the Encoder pad to the "
                            "longest caption of the batch (at most max_length); padded positions change nothing"},
        "models": {
            "image": {"file": mf.IMAGE_ONNX, "inputs": image_inputs, "outputs": outputs},
            "text": {"file": mf.TEXT_ONNX, "inputs": text_inputs, "outputs": outputs},
            "text_e2e": {"file": mf.TEXT_E2E_ONNX, "inputs": [_io("text", "string", ["batch"])],
                         "outputs": outputs + token_outputs,
                         "custom_ops": f"onnxruntime-extensions ({CONTRIB_DOMAIN}: SentencepieceTokenizer)"},
        },
        "saved_model": {"path": mf.SAVED_MODEL_DIR,
                        "signatures": {IMAGE_SIGNATURE: {"inputs": image_inputs, "outputs": outputs},
                                       TEXT_SIGNATURE: {"inputs": text_inputs, "outputs": outputs}}},
        "versions": _versions(),
        "verification": verification,
    }


# ---------------------------------------------------------------------------------------------- export
def _save_saved_model(path: Path, model, image_fn, text_fn, image_specs, text_specs):
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model.image_encoder)
    archive.track(model.text_encoder)
    archive.add_endpoint(IMAGE_SIGNATURE, image_fn, input_signature=image_specs)
    archive.add_endpoint(TEXT_SIGNATURE, text_fn, input_signature=text_specs)
    with _quiet_converter():
        archive.write_out(str(path), verbose=False)


def _move_into_place(tmp: Path, out_dir: Path):
    if out_dir.exists():  # an earlier export: checked again now (it may have changed while exporting), swapped out
        _check_out_dir(out_dir)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def export_run(run_dir_or_model, out_dir, opset: int = DEFAULT_OPSET, tokenizer=None,
               quantize: bool = False) -> Path:
    """Export a trained dual encoder's two encoders to ONNX and SavedModel, checked against TensorFlow.

    Args:
        run_dir_or_model: a run folder (`config.json`, `tokenizer.model`, `best.keras`), an opened
            `tfemde.runs.Run`, or a `DualEncoder` (then `tokenizer` is required).
        out_dir: the export folder to write. An existing export there is replaced; any other non-empty folder
            is refused.
        opset: the ONNX opset, 13 to 18 (tf2onnx 1.17's range).
        tokenizer: the training `Tokenizer` (or its `.model` path); defaults to the run's.
        quantize: also write `image.int8.onnx` and `text.int8.onnx` (int8 weights, faster on CPUs, not exact:
            each must keep a cosine of at least `INT8_MIN_COSINE` to TensorFlow's outputs). Load them with
            `Encoder.load(export_dir, precision="int8")`.

    Returns:
        `out_dir` as a `Path`, holding `image.onnx`, `text.onnx`, `text_e2e.onnx`, `saved_model/`,
        `tokenizer.model` and `manifest.json` (see the module docstring).

    Raises:
        ExportError: the converter could not map an op, or an exported graph differs from TensorFlow by more than
            1e-4, or `text_e2e.onnx` tokenizes differently from the training tokenizer. `out_dir` is untouched.
        ValueError, FileNotFoundError: bad arguments (an incomplete run folder, an unsupported opset, ...).

    Example:
        >>> # export_dir = export_run("runs/quickstart/dive_temde", "exports/dive_temde")
        >>> # from tfemde.serving import Encoder; Encoder.load(export_dir).encode_texts(["a red heart"])
    """
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or int(opset) not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be an int from {SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[-1]} (tf2onnx 1.17); "
                         f"got {opset!r}")
    opset = int(opset)
    if not isinstance(quantize, bool):
        raise ValueError(f"quantize must be True or False; got {quantize!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    model, config, tokenizer, source = _resolve(run_dir_or_model, tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        import onnx

        image_specs, text_specs, dims = _specs(config)
        image_fn, text_fn = _functions(model, config)
        _save_saved_model(tmp / mf.SAVED_MODEL_DIR, model, image_fn, text_fn, image_specs, text_specs)
        image_proto = convert_function(image_fn, image_specs, opset, dims, what="image encoder")
        text_proto = convert_function(text_fn, text_specs, opset, dims, what="text encoder")
        # The BiGRU's Loops carry their weights as loop state; as body constants they run ~20% faster.
        text_proto = inline_loop_weights(text_proto)
        e2e_proto = text_e2e_model(text_proto, tokenizer.model_proto, config.max_length, opset)
        _name_dims(e2e_proto, dims)
        for name, proto in ((mf.IMAGE_ONNX, image_proto), (mf.TEXT_ONNX, text_proto),
                            (mf.TEXT_E2E_ONNX, e2e_proto)):
            proto.doc_string = f"tfemde {config.preset} {name.split('.')[0]} encoder; see manifest.json"
            onnx.save_model(proto, str(tmp / name))
        tokenizer.save(tmp / mf.TOKENIZER_FILE)
        if quantize:
            for name in (mf.IMAGE_ONNX, mf.TEXT_ONNX):
                quantize_int8(tmp / name, tmp / int8_name(name))
        verification = _verify(tmp, image_fn, text_fn, config, tokenizer, quantized=quantize)
        manifest = _manifest(config, tokenizer, opset, verification, source)
        manifest["files"] = mf.file_records(tmp)
        (tmp / mf.MANIFEST_NAME).write_text(_dumps(manifest), encoding="utf-8")
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
