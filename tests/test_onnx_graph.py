"""tfemde.export.onnx_graph: node order that counts what loop bodies read from outside; tensordots as MatMuls; layer
normalisations as one node."""

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


def test_a_dense_layer_on_sets_converts_to_one_matmul_with_the_same_numbers():
    """tf2onnx writes a Keras Dense on a [B, K, D] tensor as Reshape -> MatMul -> Reshape with ~12 shape nodes;
    the converted graph holds the plain MatMul (and the bias Add) and computes what TensorFlow computes."""
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    from tfemde.export import convert_function

    dense = keras.layers.Dense(5)
    dense.build((None, 3, 4))
    dense.bias.assign(np.linspace(-1, 1, 5).astype(np.float32))
    spec = tf.TensorSpec([None, 3, 4], tf.float32, name="sets")
    fn = tf.function(lambda sets: {"out": dense(sets) * 2.0}, input_signature=[spec])
    proto = convert_function(fn, [spec])
    assert sorted(n.op_type for n in proto.graph.node) == ["Add", "MatMul", "Mul"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(batch).normal(size=(batch, 3, 4)).astype(np.float32)
        np.testing.assert_allclose(session.run(["out"], {"sets": x})[0], fn(tf.constant(x))["out"].numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_attention_heads_convert_without_shape_arithmetic():
    """Two tensordots in one name scope (tf2onnx names their MatMuls `heads/Tensordot/MatMul` and
    `heads/Tensordot_1/MatMul`, as in the set prediction's attention) and a head split and merge whose targets come
    from `tf.shape`: the converted graph runs no Shape node (plain MatMuls, constant Reshape targets with 0 for
    "keep this axis") and computes what TensorFlow computes for any batch and set size, a reshape whose target
    takes an axis from another position included."""
    import onnxruntime as ort
    import tensorflow as tf

    from tfemde.export import convert_function

    rng = np.random.default_rng(0)
    w_keys, w_values = (tf.Variable(rng.normal(size=(4, 8)).astype(np.float32)) for _ in range(2))

    def heads(sets):
        def split(x):  # [B, N, 8] -> [B, 2, N, 4]
            shape = tf.shape(x)
            return tf.transpose(tf.reshape(x, [shape[0], shape[1], 2, 4]), [0, 2, 1, 3])
        with tf.name_scope("heads"):
            k = split(tf.tensordot(sets, w_keys, [[2], [0]]))
            v = split(tf.tensordot(sets, w_values, [[2], [0]]))
        attention = tf.nn.softmax(tf.matmul(k, v, transpose_b=True), axis=-1)
        merged = tf.transpose(tf.matmul(attention, v), [0, 2, 1, 3])
        shape = tf.shape(merged)
        out = tf.reshape(merged, [shape[0], shape[1], 8])
        return {"out": out, "columns": tf.reshape(out, [tf.shape(out)[2], -1])}

    spec = tf.TensorSpec([None, None, 4], tf.float32, name="sets")
    fn = tf.function(heads, input_signature=[spec])
    proto = convert_function(fn, [spec])
    ops = [n.op_type for n in proto.graph.node]
    assert {n.name for n in proto.graph.node} >= {"heads/Tensordot/MatMul", "heads/Tensordot_1/MatMul"}
    assert ops.count("MatMul") == 4 and ops.count("Reshape") == 4 and ops.count("Shape") == 0, ops
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, size in ((1, 3), (3, 5), (2, 1)):
        x = rng.normal(size=(batch, size, 4)).astype(np.float32)
        want = fn(tf.constant(x))
        got = session.run(["out", "columns"], {"sets": x})
        for name, value in zip(("out", "columns"), got):
            np.testing.assert_allclose(value, want[name].numpy(), rtol=1e-5, atol=1e-6)


def _reshape_matmul_model(second_shape):
    """`x [2, 3, 4] -> Reshape [6, 4] -> MatMul W [4, 5] -> Reshape second_shape`, with constant shapes, plus a
    dead Neg node and its initializer."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(20, dtype=np.float32).reshape(4, 5) / 10
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("MatMul", ["x2", "w"], ["y2"], name="dense/Tensordot/MatMul"),
             helper.make_node("Reshape", ["y2", "back"], ["y"]), helper.make_node("Neg", ["unused"], ["dead"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([6, 4]), "flat"),
                     numpy_helper.from_array(np.array(second_shape), "back"),
                     numpy_helper.from_array(np.ones(2, np.float32), "unused")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("second_shape", [[2, 3, 5], [3, 2, 5]])
def test_reshapes_not_computed_from_the_input_shape_stay(second_shape):
    """Only reshapes whose targets come from Shape(x) are a tensordot's: constant ones (here one of them a different
    layout, [3, 2, 5]) stay, even under a tensordot's name, and the graph computes the same values; dead nodes go."""
    import onnxruntime as ort

    from tfemde.export.onnx_graph import collapse_tensordots

    model = _reshape_matmul_model(second_shape)
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
    assert collapse_tensordots(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Reshape", "MatMul", "Reshape"]
    assert sorted(t.name for t in model.graph.initializer) == ["back", "flat", "w"]
    got = ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(want, (x.reshape(6, 4) @ _weight(model)).reshape(second_shape), rtol=1e-5)


def _weight(model):
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w")


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False), (False, False)])
def test_layer_normalization_converts_to_one_node_with_the_same_numbers(rank, center, scale):
    """tf2onnx writes a Keras LayerNormalization as a dozen nodes (GlobalAveragePool or ReduceMean moments, Sqrt,
    Reciprocal, Muls, Adds); the converted graph holds one LayerNormalization with its γ and β, and computes what
    TensorFlow computes, for any batch."""
    import keras
    import onnxruntime as ort
    import tensorflow as tf
    from onnx import numpy_helper

    from tfemde.export import convert_function

    shape = (None, 3, 8) if rank == 3 else (None, 8)
    norm = keras.layers.LayerNormalization(epsilon=1e-3, center=center, scale=scale)
    norm.build(shape)
    if scale:
        norm.gamma.assign(np.linspace(0.5, 2, 8).astype(np.float32))
    if center:
        norm.beta.assign(np.linspace(-1, 1, 8).astype(np.float32))
    spec = tf.TensorSpec(shape, tf.float32, name="x")
    fn = tf.function(lambda x: {"out": norm(x) * 2.0 + x}, input_signature=[spec])
    proto = convert_function(fn, [spec])
    assert sorted(n.op_type for n in proto.graph.node) == ["Add", "LayerNormalization", "Mul"]
    node = next(n for n in proto.graph.node if n.op_type == "LayerNormalization")
    constants = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(constants[node.input[1]], norm.gamma.numpy() if scale else np.ones(8))
    np.testing.assert_allclose(constants[node.input[2]], norm.beta.numpy() if center else np.zeros(8))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = np.random.default_rng(batch).normal(size=(batch, *shape[1:])).astype(np.float32) * 3 + 1
        np.testing.assert_allclose(session.run(["out"], {"x": x})[0], fn(tf.constant(x))["out"].numpy(),
                                   rtol=1e-5, atol=1e-5)


def _layer_norm_model(mean_is_output):
    """tf2onnx's layer normalisation of `x [2, 3, 8]` (γ, β constants), the mean also an output when asked."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node
    nodes = [node("GlobalAveragePool", ["x"], ["mean"]), node("Sub", ["x", "mean"], ["d"]),
             node("Mul", ["d", "d"], ["d2"]), node("GlobalAveragePool", ["d2"], ["var"]),
             node("Add", ["var", "eps"], ["var_eps"]), node("Sqrt", ["var_eps"], ["std"]),
             node("Reciprocal", ["std"], ["inv"]), node("Mul", ["inv", "gamma"], ["s"]),
             node("Mul", ["x", "s"], ["xs"]), node("Neg", ["mean"], ["neg"]), node("Mul", ["neg", "s"], ["ms"]),
             node("Add", ["ms", "beta"], ["shift"]), node("Add", ["xs", "shift"], ["y"])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])]
    if mean_is_output:
        out.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [2, 3, 1]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])], out,
        initializer=[numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
                     numpy_helper.from_array(np.linspace(0.5, 2, 8).reshape(1, 1, 8).astype(np.float32), "gamma"),
                     numpy_helper.from_array(np.linspace(-1, 1, 8).reshape(1, 1, 8).astype(np.float32), "beta")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("mean_is_output", [False, True])
def test_a_normalisation_is_fused_only_when_nothing_else_reads_its_moments(mean_is_output):
    """The same chain fuses into one node; when the mean is also an output, fusing would drop a value the graph
    gives, so nothing changes. The outputs are the same either way."""
    import onnxruntime as ort

    from tfemde.export.onnx_graph import fuse_layer_norms

    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 2 + 1
    before = _layer_norm_model(mean_is_output)
    want = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    after = _layer_norm_model(mean_is_output)
    assert fuse_layer_norms(after) == (0 if mean_is_output else 1)
    assert len(after.graph.node) == (13 if mean_is_output else 1)
    got = ort.InferenceSession(after.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    mean, std = x.mean(-1, keepdims=True), x.std(-1, keepdims=True)
    np.testing.assert_allclose(got[0], (x - mean) / np.sqrt(std ** 2 + 1e-5) * np.linspace(0.5, 2, 8)
                               + np.linspace(-1, 1, 8), rtol=1e-4, atol=1e-4)
