"""Opt-in int8 encoders: onnxruntime dynamic quantization of an exported ONNX graph.

The weights of every MatMul become 8-bit integers (one scale per output channel) and the activations are quantized per call,
so a single-item call reads a quarter of the float32 weight bytes, which is what bounds its latency on a CPU.
onnxruntime has no int8 `GRU` kernel, so an int8 graph is quantized from a `Scan` form of the encoder's BiGRUs
(`tfemde.export.native_rnn`'s lean Scan; the float32 graphs use the ONNX `GRU` op): a float GRU would read four times
the bytes of the quantized recurrent weights at every step. The lean Scan's body multiplies by its own initializer;
tf2onnx's Loops (`export_run(..., native_rnn=False)`) carry their recurrent weights as loop-carried values, and the
quantizer only sees initializers, so `inline_loop_weights` first turns the loop-invariant weights such a body
multiplies by into initializers of the body.

The weights are quantized to uint8 (asymmetric, one scale and zero point per output channel), so every MatMul runs
onnxruntime's U8U8 kernels. Its default, int8 weights (U8S8), is exact only with VNNI: x86-64 CPUs without it (AVX2,
AVX-512 without VNNI) multiply with `vpmaddubsw`, which saturates the int16 sum of two uint8 x int8 products, and
the graphs then drift far from their float32 originals (cosine 0.60 / 0.92 for the image / text graph of the test
suite's model under an emulated Haswell, against 0.9998 / 0.99996 with VNNI). The U8U8 kernels widen to 16 bits
before multiplying and never saturate, so the integer results, and the int8 graphs' outputs, are the same on every
x86-64 CPU.

CPUs with VNNI (`avx512_vnni`, `avx_vnni`) multiply uint8 x int8 exactly, and there onnxruntime's U8S8 kernels
are the fast ones (the DivE image graph 1.8x, its text graph 1.1x faster than U8U8 on an Intel Xeon with VNNI and
AMX), so a quantized export also holds each int8 graph with its weights shifted to int8 (`signed_weights`:
w - 128 with zero point z - 128, the same integers after the zero point is taken off) in `*.int8.vnni.onnx`. The
serving `Encoder` runs that copy only on a CPU with VNNI, where its outputs equal the uint8 graph's.

The int8 graphs are not exact: `tfemde.export.export_run(..., quantize=True)` measures how far they are from
TensorFlow (cosine of every set element and sketch row) and records it in the manifest.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tfemde.export.onnx_graph import sort_nodes

INT8_SUFFIX = ".int8.onnx"
VNNI_SUFFIX = ".int8.vnni.onnx"
METHOD = ("onnxruntime dynamic quantization: uint8 per-channel asymmetric MatMul weights (loop bodies included), "
          "uint8 activations quantized per call (U8U8 kernels: no int16 saturation on CPUs without VNNI); not "
          "exact, see min_cosine. vnni_file: the same graph with the weights shifted to int8 (the same integers; "
          "U8S8 kernels, run on CPUs with VNNI)")


def int8_name(name: str) -> str:
    """`"image.onnx"` -> `"image.int8.onnx"`."""
    if not name.endswith(".onnx"):
        raise ValueError(f"name must end with .onnx; got {name!r}")
    return name[: -len(".onnx")] + INT8_SUFFIX


def vnni_name(name: str) -> str:
    """`"image.onnx"` -> `"image.int8.vnni.onnx"`."""
    return int8_name(name)[: -len(INT8_SUFFIX)] + VNNI_SUFFIX


def signed_weights(model):
    """Shift the uint8 weights (and their zero points) of every `MatMulInteger` to int8, loop bodies included,
    in place; returns `model`.

    `w - 128` with zero point `z - 128` is the same integer `w - z` for every weight, so the graph computes what it
    did; onnxruntime then runs its U8S8 kernels, exact and faster where the CPU has VNNI (see the module docstring).
    """
    import numpy as np
    from onnx import AttributeProto, TensorProto, numpy_helper

    def shift(graph):
        initializers = {tensor.name: tensor for tensor in graph.initializer}
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == AttributeProto.GRAPH:
                    shift(attribute.g)
            if node.op_type != "MatMulInteger" or len(node.input) < 4:
                continue
            for name in (node.input[1], node.input[3]):
                tensor = initializers.get(name)
                if tensor is not None and tensor.data_type == TensorProto.UINT8:
                    values = numpy_helper.to_array(tensor).astype(np.int16) - 128
                    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.int8), name))

    shift(model.graph)
    return model


def write_vnni_copy(int8_file, target) -> Path:
    """Write `signed_weights` of the int8 graph `int8_file` to `target`; returns `target` as a `Path`."""
    import onnx

    target = Path(target)
    model = signed_weights(onnx.load(str(int8_file)))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(target))
    return target


def inline_loop_weights(model):
    """Make the weights that `Loop` bodies multiply by initializers of those bodies (in place); returns `model`.

    A MatMul inside a loop body whose second input is a loop-carried value fed, from outside, by an initializer
    gets a body initializer with that value instead. When the body only multiplies by that value and passes it
    through unchanged, and nothing uses its final value, the value stops being carried at all (otherwise the
    quantizer would quantize the outer initializer and dequantize it on every call just to feed the loop).
    The float32 graph computes exactly what it did.
    """
    import onnx

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    used_outside = {name for node in model.graph.node for name in node.input}
    used_outside |= {output.name for output in model.graph.output}
    for node in model.graph.node:
        if node.op_type != "Loop":
            continue
        body = next(attr.g for attr in node.attribute if attr.name == "body")
        existing = {tensor.name for tensor in body.initializer}
        # Loop inputs (M, cond, v_initial...), body inputs (iteration, cond, v...), body outputs (cond, v..., scans),
        # Loop outputs (v_final..., scans): carried value k sits at these positions.
        for k in reversed(range(2, min(len(node.input), len(body.input)))):
            inner, outer = body.input[k].name, node.input[k]
            users = [n for n in body.node if inner in n.input]
            if outer not in initializers or not users or not all(
                    n.op_type == "MatMul" and list(n.input).index(inner) == 1 for n in users):
                continue
            name = f"{inner}__invariant"
            if name not in existing:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[outer])
                copy.name = name
                body.initializer.append(copy)
                existing.add(name)
            for user in users:
                user.input[1] = name
            if body.output[k - 1].name == inner and node.output[k - 2] not in used_outside:
                del body.input[k], body.output[k - 1], node.input[k], node.output[k - 2]
    return model


def quantize_int8(source, target) -> Path:
    """Write the int8 version of the ONNX graph `source` to `target` (dynamic quantization, per-channel uint8
    weights; see the module docstring for why not int8 weights).

    Args:
        source: a float32 `.onnx` file (an exported `image.onnx` or `text.onnx`).
        target: the `.onnx` file to write.

    Returns:
        `target` as a `Path`.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"ONNX file to quantize not found: {source}")
    model = inline_loop_weights(onnx.load(str(source)))
    handle, staged = tempfile.mkstemp(suffix=".onnx", dir=target.parent)
    os.close(handle)
    try:
        onnx.save_model(model, staged)
        quantize_dynamic(staged, str(target), weight_type=QuantType.QUInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"EnableSubgraph": True})
        # The quantizer appends the nodes it makes; a loop body reading one of them from the outer scope would then
        # come before its producer, which onnxruntime tolerates and onnx.checker does not.
        quantized = onnx.load(str(target))
        sort_nodes(quantized.graph)
        onnx.checker.check_model(quantized)
        onnx.save_model(quantized, str(target))
    finally:
        os.remove(staged)
    return target
