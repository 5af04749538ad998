"""The memory-traffic floor of one item: how many bytes of weights an exported graph reads per call, and how fast
this machine streams weights through batch-1 products, so how fast any graph of that model could possibly be.

At batch 1 most products are a vector times a weight matrix: each weight is read once per use and used once, so
a call cannot take less than (weight bytes read) / (the rate the cores can stream weights). A recurrence reads its
recurrent matrix once per token; a weight shared by several layers is read once per layer (the set prediction's
four blocks share theirs, and a matrix of several MB does not stay in a core's L2 from one block to the next).

    python benchmarks/weight_traffic.py EXPORT_DIR [--tokens 12]   # the floor of an export's graphs here

`benchmarks/serving.py` prints the same floor beside its timings and the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Ops whose weight inputs are read in full each time they run. A Gather (word embeddings) reads only its rows.
PRODUCTS = frozenset({"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
                      "MatMulIntegerToFloat", "QLinearMatMul", "MatMulNBits", "Conv", "GRU", "LSTM", "RNN"})
RECURRENT = frozenset({"GRU", "LSTM", "RNN"})
# Inputs of a recurrent op read once per step: the recurrent weights R (ONNX GRU / LSTM / RNN input 2).
RECURRENT_STEP_INPUTS = (2,)
LOOPS = frozenset({"Loop", "Scan"})
MIN_WEIGHT_BYTES = 1 << 16


def weight_reads(path, steps: int, min_bytes: int = MIN_WEIGHT_BYTES) -> dict:
    """Bytes of weights one call of the ONNX model at `path` reads at batch 1, by op type.

    Counted: every initializer of at least `min_bytes` that a product op takes as an input, once per time the op
    runs: once in the main graph, `steps` times inside a `Loop` / `Scan` body (initializers of an enclosing graph
    included), and a recurrent op's R once per step (its W and B once).

    Args:
        path: an `.onnx` file.
        steps: the sequence length a recurrence runs for (a caption's tokens); nested loops multiply.
        min_bytes: smaller initializers (scales, biases, shapes) are not weights that bound the call.

    Returns:
        `{op_type: bytes}`.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    reads = {}

    def walk(graph, times, outer):
        sizes = dict(outer)
        sizes.update({t.name: numpy_helper.to_array(t).nbytes for t in graph.initializer})
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g, times * (steps if node.op_type in LOOPS else 1), sizes)
            if node.op_type not in PRODUCTS:
                continue
            for position, name in enumerate(node.input):
                size = sizes.get(name, 0)
                if size >= min_bytes:
                    per_step = node.op_type in RECURRENT and position in RECURRENT_STEP_INPUTS
                    reads[node.op_type] = reads.get(node.op_type, 0) + size * times * (steps if per_step else 1)

    walk(model.graph, 1, {})
    return reads


def _product_chain(dtype: str, matrices: int, products: int, rows: int, cols: int):
    """An ONNX model of `products` chained batch-1 products `[1, rows] x [rows, cols]`, cycling over `matrices`
    distinct weight matrices (together larger than a core's L2), each output sliced back to `rows` wide."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if dtype == "int8":
        weights = [numpy_helper.from_array(rng.integers(-127, 128, size=(rows, cols)).astype(np.int8), f"w{i}")
                   for i in range(matrices)]
        weights.append(numpy_helper.from_array(np.array(0.01, np.float32), "scale"))
    else:
        weights = [numpy_helper.from_array((rng.normal(size=(rows, cols)) * 0.03).astype(np.float32), f"w{i}")
                   for i in range(matrices)]
    constants = [numpy_helper.from_array(np.array([value], np.int64), name)
                 for name, value in (("start", 0), ("end", rows), ("axis", 1))]
    nodes, x = [], "x"
    for i in range(products):
        if dtype == "int8":
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"w{i % matrices}", "scale"], [f"p{i}"],
                                          domain="com.microsoft"))
        else:
            nodes.append(helper.make_node("MatMul", [x, f"w{i % matrices}"], [f"p{i}"]))
        nodes.append(helper.make_node("Slice", [f"p{i}", "start", "end", "axis"], [f"s{i}"]))
        x = f"s{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], weights + constants)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    bytes_per_call = products * rows * cols * (1 if dtype == "int8" else 4)
    return model.SerializeToString(), bytes_per_call


def streaming_rates(seconds: float = 1.0, threads=None) -> dict:
    """GB/s of weights that batch-1 products stream here: float32 `MatMul` and int8 `DynamicQuantizeMatMul`
    (what the exported graphs run), 24 chained `[1, 1024] x [1024, 3072]` products over 8 distinct matrices
    (a BiGRU's recurrent matrix; 100 MB float32, 25 MB int8), median call, sessions as `Encoder` makes them."""
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tfemde.serving.providers import make_session

    rates = {}
    x = {"x": np.random.default_rng(1).normal(size=(1, 1024)).astype(np.float32)}
    for dtype in ("float32", "int8"):
        model, bytes_per_call = _product_chain(dtype, matrices=8, products=24, rows=1024, cols=3072)
        session = make_session(model, providers=["CPUExecutionProvider"], threads=threads)
        for _ in range(5):
            session.run(None, x)
        times, started = [], time.perf_counter()
        while len(times) < 5 or (time.perf_counter() - started < seconds and len(times) < 500):
            t = time.perf_counter()
            session.run(None, x)
            times.append(time.perf_counter() - t)
        rates[dtype] = bytes_per_call / statistics.median(times) / 1e9
        del session
    return rates


def floor_ms(reads: dict, rate_gb_s: float) -> float:
    """The least time in ms a call reading `reads` (`weight_reads`) can take at `rate_gb_s`."""
    return sum(reads.values()) / (rate_gb_s * 1e9) * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", help="an export folder (tfemde export)")
    parser.add_argument("--tokens", type=int, default=12, help="caption length the recurrence runs for")
    args = parser.parse_args(argv)
    rates = streaming_rates()
    report = {"rates_gb_s": rates}
    for name in sorted(os.listdir(args.export_dir)):
        if name.endswith(".onnx") and not name.startswith("text_e2e"):
            reads = weight_reads(os.path.join(args.export_dir, name), args.tokens)
            rate = rates["int8" if ".int8" in name else "float32"]
            report[name] = {"mb": round(sum(reads.values()) / 1e6, 1), "floor_ms": round(floor_ms(reads, rate), 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
