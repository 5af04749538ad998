"""tfemde.export.onnx_graph.sort_nodes: topological order that counts what loop bodies read from outside."""

import numpy as np
import pytest


def _loop_model(order):
    """`y = Loop(3 steps, body: h + x)` where the body reads `x` (made by a Neg node) from the outer scope."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["h", "x"], ["h_next"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [2])])
    nodes = {"neg": helper.make_node("Neg", ["a"], ["x"]),
             "loop": helper.make_node("Loop", ["steps", "keep", "h0"], ["y"], body=body)}
    graph = helper.make_graph(
        [nodes[name] for name in order], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.array(3, np.int64), "steps"),
                     numpy_helper.from_array(np.array(True), "keep")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sort_puts_a_loop_after_what_its_body_reads():
    import onnx
    import onnxruntime as ort

    from tfemde.export.onnx_graph import sort_nodes

    model = _loop_model(["loop", "neg"])
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    sort_nodes(model.graph)
    assert [n.op_type for n in model.graph.node] == ["Neg", "Loop"]
    onnx.checker.check_model(model)
    y = ort.InferenceSession(model.SerializeToString()).run(
        ["y"], {"a": np.array([1, 2], np.float32), "h0": np.array([10, 10], np.float32)})[0]
    np.testing.assert_allclose(y, [7, 4])
    sort_nodes(model.graph)  # an ordered graph stays as it is
    assert [n.op_type for n in model.graph.node] == ["Neg", "Loop"]


def test_sort_refuses_a_cycle():
    from onnx import helper

    from tfemde.export.onnx_graph import sort_nodes

    graph = helper.make_graph([helper.make_node("Neg", ["b"], ["a"]), helper.make_node("Neg", ["a"], ["b"])], "g",
                              [], [])
    with pytest.raises(ValueError, match="graph 'g' has a cycle"):
        sort_nodes(graph)
