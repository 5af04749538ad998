"""benchmarks/weight_traffic.py: the weights one call reads, counted per use, per recurrence step and per loop trip."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from weight_traffic import _product_chain, weight_reads  # noqa: E402

HIDDEN, WIDTH, STEPS = 64, 32, 5


def _model(tmp_path):
    """A shared [256, 256] float32 weight used by two MatMuls, a one-direction GRU, and a Loop whose body
    multiplies by an int8 weight of the outer graph."""
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(256, 256)).astype(np.float32)                      # 256 KiB, read twice
    gru_w = rng.normal(size=(1, 3 * HIDDEN, 256)).astype(np.float32)            # 192 KiB, read once
    gru_r = rng.normal(size=(1, 3 * HIDDEN, HIDDEN)).astype(np.float32) * 0.1   # 48 KiB: below the threshold
    loop_w = rng.integers(-127, 128, size=(256, 512)).astype(np.int8)            # 128 KiB, read each trip
    small = rng.normal(size=(16, 256)).astype(np.float32)                        # 16 KiB: not a weight
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMulInteger", ["q", "loop_w"], ["acc"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc", TensorProto.INT32, None)])
    nodes = [helper.make_node("MatMul", ["x", "shared"], ["h1"]),
             helper.make_node("MatMul", ["h1", "shared"], ["h2"]),
             helper.make_node("MatMul", ["small_in", "small"], ["s"]),
             helper.make_node("Unsqueeze", ["h2", "seq_axis"], ["seq"]),
             helper.make_node("GRU", ["seq", "gru_w", "gru_r"], ["y", "y_h"], hidden_size=HIDDEN),
             helper.make_node("Loop", ["trips", "cond"], ["accs"], body=body)]
    inits = [numpy_helper.from_array(a, n) for a, n in ((shared, "shared"), (gru_w, "gru_w"), (gru_r, "gru_r"),
                                                        (loop_w, "loop_w"), (small, "small"))]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "seq_axis"),
              numpy_helper.from_array(np.array(STEPS, np.int64), "trips"),
              numpy_helper.from_array(np.array(True), "cond"),
              numpy_helper.from_array(np.ones((1, 256), np.uint8), "q")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [STEPS, 256]),
                                           helper.make_tensor_value_info("small_in", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y_h", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("accs", TensorProto.INT32, None),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, {"MatMul": 2 * shared.nbytes, "GRU": gru_w.nbytes, "MatMulInteger": STEPS * loop_w.nbytes}


def test_weight_reads_counts_each_use_and_each_loop_trip(tmp_path):
    path, expected = _model(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a graph that runs
    y_h, accs, _ = session.run(None, {"x": np.ones((STEPS, 256), np.float32), "small_in": np.ones((1, 16), np.float32)})
    assert y_h.shape == (1, 1, HIDDEN) and accs.shape == (STEPS, 1, 512)
    assert weight_reads(path, steps=STEPS) == expected


def test_recurrent_weights_are_read_once_per_step(tmp_path):
    path, expected = _model(tmp_path)
    reads = weight_reads(path, steps=STEPS, min_bytes=1)
    gru_r = 3 * HIDDEN * HIDDEN * 4
    assert reads["GRU"] == expected["GRU"] + STEPS * gru_r
    assert reads["MatMul"] == expected["MatMul"] + 16 * 256 * 4


def test_the_rate_probe_computes_its_chain_of_products():
    for dtype in ("float32", "int8"):
        model, bytes_per_call = _product_chain(dtype, matrices=3, products=4, rows=8, cols=24)
        assert bytes_per_call == 4 * 8 * 24 * (4 if dtype == "float32" else 1)
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(2).normal(size=(1, 8)).astype(np.float32)
        (got,) = session.run(None, {"x": x})
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(model).graph.initializer}
        want = x.astype(np.float64)
        for i in range(4):
            w = weights[f"w{i % 3}"].astype(np.float64)
            if dtype == "int8":
                w = w * 0.01
            want = (want @ w)[:, :8]
        np.testing.assert_allclose(got, want, rtol=0.05 if dtype == "int8" else 1e-4, atol=0.05 * np.abs(want).max())
