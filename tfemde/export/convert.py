"""tf2onnx conversion of a `tf.function` to a checked ONNX graph, with the converter's logging kept quiet.

Any converter ERROR, "unsupported" op, non-ONNX op or `onnx.checker` failure raises `ExportError`.
"""

from __future__ import annotations

import contextlib
import logging

from tfemde.export.onnx_graph import collapse_tensordots, fuse_layer_norms, static_reshapes

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = tuple(range(13, 19))  # tf2onnx 1.17 stops at 18


class ExportError(RuntimeError):
    """The export could not be converted or failed its own checks; nothing was written to the output folder."""


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
        The checked `onnx.ModelProto`, its Dense layers on 3-D tensors as plain MatMuls and its layer
        normalisations as `LayerNormalization` nodes (`tfemde.export.onnx_graph`).

    Raises:
        ExportError: tf2onnx logged an ERROR or an unsupported op, left a non-ONNX op in the graph, or the graph
            fails `onnx.checker`.
    """
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
    collapse_tensordots(proto)
    static_reshapes(proto)
    fuse_layer_norms(proto)
    return checked(proto, dims, f"converted {what}")


def checked(proto, dims=None, what="model"):
    """`proto` after `onnx.checker` (an `ExportError` naming `what` when it fails), its dynamic axes named by `dims`."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"the {what} is not a valid ONNX graph: {error}") from error
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
