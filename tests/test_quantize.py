"""Opt-in int8 export: loop weights inlined without changing the float graph, the quantizer reaching the BiGRU's
loop bodies, the cosine check against Keras (recomputed here), the int8 Encoder, and the errors.

One tiny `dive_temde` run on region features (K = 2, with a sketch, a BiGRU text tower) is exported once with
`tfemde export --quantize`.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tfemde.export.quantize import inline_loop_weights, int8_name, quantize_int8, vnni_name, write_vnni_copy
from tfemde.serving import Encoder
from tfemde.serving import manifest as mf
from tfemde.serving.providers import cpu_has_vnni
from test_export import _caption_feeds, _keras, _region_feeds, _write_run

SIZES = dict(embed_dim=16, word_dim=8, num_slots=2, set_depth=1, set_heads=2, sketch_depth=4, sketch_bits=3)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from tfemde.cli import main

    tmp = tmp_path_factory.mktemp("quantized")
    model, tokenizer = _write_run(tmp / "run", preset="dive_temde", **SIZES)
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "export"), "--quantize"]) == 0
    return {"model": model, "tokenizer": tokenizer, "dir": tmp / "export", "tmp": tmp}


def _loop_bodies(model, op_type="Loop"):
    return [attr.g for node in model.graph.node if node.op_type == op_type for attr in node.attribute
            if attr.name == "body"]


def _cosines(a, b):
    """Cosines of matching vectors (last axis); vectors that are zero in `b` (all-padded captions) must be ~zero in
    `a` and are left out."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    zero = np.linalg.norm(b, axis=-1) == 0
    assert np.abs(a[zero]).max(initial=0.0) < 1e-6
    a, b = a[~zero], b[~zero]
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _loop_model(carried_weight_used_outside=False):
    """`y = x @ W @ W @ W` as an ONNX Loop of 3 steps that carries W as loop state, the way tf2onnx converts a
    Keras RNN: the body multiplies by W and passes W through unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32) / 3
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "w_in"], ["h_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [8, 8])])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])]
    if carried_weight_used_outside:
        outputs.append(helper.make_tensor_value_info("w_final", TensorProto.FLOAT, [8, 8]))
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "keep_going", "x", "W"], ["y", "w_final"], body=body)],
        "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])], outputs,
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(3, np.int64), "trips"),
                     numpy_helper.from_array(np.array(True), "keep_going")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_inlining_loop_weights_keeps_the_outputs_and_drops_the_carried_weight(tmp_path, rng):
    model, w = _loop_model()
    x = rng.normal(size=(2, 8)).astype(np.float32)
    want = x @ w @ w @ w
    onnx.save_model(model, str(tmp_path / "loop.onnx"))
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "loop.onnx")).run(["y"], {"x": x})[0], want,
                               rtol=1e-5, atol=1e-6)

    inlined = inline_loop_weights(model)
    onnx.checker.check_model(inlined)
    (loop,) = inlined.graph.node
    (body,) = _loop_bodies(inlined)
    assert list(loop.input) == ["trips", "keep_going", "x"] and list(loop.output) == ["y"]
    assert [t.name for t in body.initializer] == ["w_in__invariant"] and len(body.input) == 3
    onnx.save_model(inlined, str(tmp_path / "inlined.onnx"))
    got = ort.InferenceSession(str(tmp_path / "inlined.onnx")).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    kept, _ = _loop_model(carried_weight_used_outside=True)  # its final value is a graph output: still carried
    kept = inline_loop_weights(kept)
    assert list(kept.graph.node[0].input) == ["trips", "keep_going", "x", "W"]
    assert _loop_bodies(kept)[0].node[1].input[1] == "w_in__invariant"

    quantize_int8(tmp_path / "loop.onnx", tmp_path / "loop.int8.onnx")
    quantized = onnx.load(str(tmp_path / "loop.int8.onnx"))
    ops = {n.op_type for body in _loop_bodies(quantized) for n in body.node}
    assert "MatMul" not in ops and ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops
    assert "DequantizeLinear" not in {n.op_type for n in quantized.graph.node}  # no weight dequantized per call
    got = ort.InferenceSession(str(tmp_path / "loop.int8.onnx")).run(["y"], {"x": x})[0]
    assert _cosines(got, want).min() >= 0.99


def test_exported_text_graphs_recurrence(quantized):
    """float32: the BiGRU as one ONNX GRU op; int8: quantized from the lean Scans (no int8 GRU kernel), one body
    per direction, each multiplying by one int8 constant only, in an order onnx.checker accepts."""
    exact = onnx.load(str(quantized["dir"] / mf.TEXT_ONNX))
    assert "GRU" in {n.op_type for n in exact.graph.node} and not _loop_bodies(exact, "Scan")
    fast = onnx.load(str(quantized["dir"] / int8_name(mf.TEXT_ONNX)))
    onnx.checker.check_model(fast)
    assert not _loop_bodies(fast)
    bodies = _loop_bodies(fast, "Scan")
    assert len(bodies) == 2
    for body in bodies:
        ops = [n.op_type for n in body.node]
        assert "MatMul" not in ops and sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in ops) == 1, ops


def test_quantized_export_records_and_meets_its_cosine_check(quantized, rng):
    manifest = json.loads((quantized["dir"] / mf.MANIFEST_NAME).read_text())
    entry = manifest["quantized"]
    for what, exported in (("image", mf.IMAGE_ONNX), ("text", mf.TEXT_ONNX)):
        assert entry[what]["file"] == int8_name(exported) and entry[what]["of"] == exported
        assert entry[what]["file"] in manifest["files"]  # checksummed like every other file
        assert 0.99 <= entry[what]["min_cosine"] <= 1.0
        assert entry[what]["max_abs_diff"] > 0  # really quantized, not a copy

    model, depth = quantized["model"], SIZES["sketch_depth"]
    cases = {"image": (_region_feeds(rng, 5, 9), model.image_encoder),
             "text": (_caption_feeds(rng, 5, 8, quantized["tokenizer"].vocab_size), model.text_encoder)}
    for what, (feeds, encoder) in cases.items():
        session = ort.InferenceSession(str(quantized["dir"] / entry[what]["file"]))
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        want = _keras(encoder, feeds)
        assert _cosines(got["set"], want["set"]).min() >= 0.99
        sketch_rows = lambda x: x.reshape(len(x), depth, -1)  # noqa: E731
        assert _cosines(sketch_rows(got["sketch"]), sketch_rows(want["sketch"])).min() >= 0.99


def test_int8_encoder_agrees_with_the_float_encoder(quantized, rng):
    exact = Encoder.load(quantized["dir"])
    fast = Encoder.load(quantized["dir"], precision="int8")
    assert "precision int8" in repr(fast) and fast.precision == "int8"
    texts = ["a man riding a horse", "dog", "a small red ball on the street"]
    a, b = exact.encode_texts(texts), fast.encode_texts(texts)
    assert _cosines(a.sets, b.sets).min() >= 0.99
    regions = rng.normal(size=(4, 36, 24)).astype(np.float32)
    a, b = exact.encode_images(regions), fast.encode_images(regions)
    assert _cosines(a.sets, b.sets).min() >= 0.99
    name = vnni_name if cpu_has_vnni() else int8_name
    assert set(fast._sessions) == {name(mf.TEXT_ONNX), name(mf.IMAGE_ONNX)}


def test_int8_errors(quantized, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        Encoder.load(quantized["dir"], precision="float16")
    with pytest.raises(ValueError, match="text_route='sentencepiece'"):
        Encoder.load(quantized["dir"], precision="int8", text_route="e2e")
    plain = tmp_path / "plain"
    shutil.copytree(quantized["dir"], plain)
    manifest = json.loads((plain / mf.MANIFEST_NAME).read_text())
    del manifest["quantized"]
    (plain / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert Encoder.load(plain).precision == "float32"
    with pytest.raises(ValueError, match="no int8 graphs; export with quantize=True"):
        Encoder.load(plain, precision="int8")
    running = (vnni_name if cpu_has_vnni() else int8_name)(mf.TEXT_ONNX)  # the int8 text graph this CPU runs
    (plain / running).write_bytes(b"corrupt")
    manifest["quantized"] = json.loads((quantized["dir"] / mf.MANIFEST_NAME).read_text())["quantized"]
    (plain / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(mf.ExportFileError, match=running.replace(".", r"\.")):
        Encoder.load(plain, precision="int8")


def test_int8_below_the_cosine_floor_fails_the_export_and_writes_nothing(quantized, monkeypatch):
    import tfemde.export as export
    import tfemde.export.verify

    monkeypatch.setattr(tfemde.export.verify, "INT8_MIN_COSINE", 1.0 + 1e-9)
    out = quantized["tmp"] / "refused"
    with pytest.raises(export.ExportError, match="int8 graphs are too far from TensorFlow"):
        export.export_run(quantized["tmp"] / "run", out, quantize=True)
    assert not out.exists()
    assert not [p for p in quantized["tmp"].iterdir() if p.name.startswith(".refused")]


def _saturating_matmul(tmp_path, rng):
    """A float MatMul whose quantized form hits the int16 saturation of U8S8 kernels without VNNI: activations
    near the top of the uint8 range, every other input at the batch maximum, weights at both extremes."""
    from onnx import TensorProto, helper, numpy_helper

    w = rng.normal(size=(256, 32)).astype(np.float32)
    w[::2] = np.where(w[::2] > 0, 3.0, -3.0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        initializer=[numpy_helper.from_array(w, "W")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    x = np.abs(rng.normal(size=(6, 256))).astype(np.float32)
    x[:, ::2] = x.max()
    return x


def _dequantized_reference(model, x):
    """NumPy re-derivation of the quantized MatMul: DynamicQuantizeLinear of `x` (ONNX's definition), the stored
    uint8 weights with their per-column scales and zero points, an exact integer product, then the scales."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    (w_q,) = [v for v in init.values() if v.ndim == 2]
    (w_scale,) = [v for k, v in init.items() if v.ndim == 1 and v.dtype == np.float32 and "scale" in k]
    (w_zero,) = [v for k, v in init.items() if v.ndim == 1 and v.dtype == w_q.dtype and "zero_point" in k]
    low, high = min(x.min(), 0.0), max(x.max(), 0.0)
    x_scale = np.float32((high - low) / 255)
    x_zero = np.clip(np.rint(-low / x_scale), 0, 255)
    x_q = np.clip(np.rint(x / x_scale) + x_zero, 0, 255)
    product = (x_q.astype(np.int64) - int(x_zero)) @ (w_q.astype(np.int64) - w_zero.astype(np.int64))
    return product * (x_scale * w_scale.astype(np.float64))


def test_int8_weights_are_uint8_so_no_cpu_kernel_saturates(tmp_path, rng):
    """On x86-64 without VNNI (AVX2), onnxruntime's uint8 x int8 kernels saturate int16 pair sums; the export
    quantizes weights to uint8 (U8U8 kernels, no saturation), so the integer product is exact on every CPU: the
    int8 graph equals the NumPy re-derivation of its own arithmetic, here and on an AVX2-only machine alike."""
    x = _saturating_matmul(tmp_path, rng)
    quantize_int8(tmp_path / "mm.onnx", tmp_path / "mm.int8.onnx")
    model = onnx.load(str(tmp_path / "mm.int8.onnx"))
    weights = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.UINT8 for t in weights)
    got = ort.InferenceSession(str(tmp_path / "mm.int8.onnx"), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x})[0]
    want = _dequantized_reference(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_every_quantized_weight_in_the_exported_graphs_is_uint8(quantized):
    """The same for the BiGRU's loop bodies and every other MatMul of both exported int8 graphs."""
    for name in (mf.IMAGE_ONNX, mf.TEXT_ONNX):
        model = onnx.load(str(quantized["dir"] / int8_name(name)))
        graphs = [model.graph] + _loop_bodies(model)
        quantized_ops = [n for g in graphs for n in g.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
        assert quantized_ops, name
        inits = {t.name: t for g in graphs for t in g.initializer}
        for node in quantized_ops:
            weight = inits[node.input[1]]
            assert weight.data_type == onnx.TensorProto.UINT8, (name, node.name)


def _weight_integers(model):
    """`{weight name: w - zero point}` (int64) of every `MatMulInteger` of `model` and its loop bodies."""
    from onnx import numpy_helper

    graphs = [model.graph] + _loop_bodies(model)
    inits = {t.name: t for g in graphs for t in g.initializer}
    out = {}
    for node in (n for g in graphs for n in g.node if n.op_type == "MatMulInteger"):
        weight, zero = (numpy_helper.to_array(inits[node.input[i]]) for i in (1, 3))
        out[node.input[1]] = (weight.dtype, weight.astype(np.int64) - zero.astype(np.int64))
    return out


def test_vnni_copies_hold_the_same_integers_as_int8_weights(quantized, tmp_path, rng):
    """`*.int8.vnni.onnx` (checksummed in the manifest) holds every quantized weight of its int8 graph, loop bodies
    included, as int8 with the same `w - zero point`; on a CPU with VNNI (where the Encoder runs it) the saturating
    MatMul's U8S8 product equals the NumPy re-derivation, as the uint8 graph's does everywhere."""
    manifest = json.loads((quantized["dir"] / mf.MANIFEST_NAME).read_text())
    for what, exported in (("image", mf.IMAGE_ONNX), ("text", mf.TEXT_ONNX)):
        entry = manifest["quantized"][what]
        assert entry["vnni_file"] == vnni_name(exported) and entry["vnni_file"] in manifest["files"]
        unsigned = _weight_integers(onnx.load(str(quantized["dir"] / entry["file"])))
        signed = _weight_integers(onnx.load(str(quantized["dir"] / entry["vnni_file"])))
        assert unsigned and unsigned.keys() == signed.keys()
        for name, (dtype, integers) in signed.items():
            assert dtype == np.int8 and unsigned[name][0] == np.uint8, name
            np.testing.assert_array_equal(integers, unsigned[name][1])

    x = _saturating_matmul(tmp_path, rng)
    quantize_int8(tmp_path / "mm.onnx", tmp_path / "mm.int8.onnx")
    write_vnni_copy(tmp_path / "mm.int8.onnx", tmp_path / "mm.int8.vnni.onnx")
    model = onnx.load(str(tmp_path / "mm.int8.vnni.onnx"))
    assert [t.data_type for t in model.graph.initializer if len(t.dims) == 2] == [onnx.TensorProto.INT8]
    want = _dequantized_reference(model, x)
    np.testing.assert_allclose(want, _dequantized_reference(onnx.load(str(tmp_path / "mm.int8.onnx")), x))
    if cpu_has_vnni():
        got = ort.InferenceSession(str(tmp_path / "mm.int8.vnni.onnx"), providers=["CPUExecutionProvider"]).run(
            ["y"], {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_int8_encoder_runs_the_vnni_copies_only_where_the_cpu_has_vnni(quantized, monkeypatch, tmp_path):
    import tfemde.serving.encoder as encoder_module

    texts = ["a man riding a horse", "dog"]
    runs = {}
    for vnni in (False, True):
        monkeypatch.setattr(encoder_module, "cpu_has_vnni", lambda vnni=vnni: vnni)
        encoder = Encoder.load(quantized["dir"], precision="int8")
        runs[vnni] = encoder.encode_texts(texts).sets
        name = vnni_name if vnni else int8_name
        assert set(encoder._sessions) == {name(mf.TEXT_ONNX)}
    if cpu_has_vnni():
        np.testing.assert_allclose(runs[True], runs[False], atol=1e-6)
    older = tmp_path / "older"  # an export written before the VNNI copies: its int8 graphs on every CPU
    shutil.copytree(quantized["dir"], older)
    manifest = json.loads((older / mf.MANIFEST_NAME).read_text())
    for what in ("image", "text"):
        del manifest["quantized"][what]["vnni_file"]
    (older / mf.MANIFEST_NAME).write_text(json.dumps(manifest))
    encoder = Encoder.load(older, precision="int8")
    encoder.encode_texts(texts)
    assert set(encoder._sessions) == {int8_name(mf.TEXT_ONNX)}


@pytest.mark.parametrize("flags, expected", [("fpu sse2 avx2 avx512f avx512_vnni", True), ("fpu avx2 avx_vnni", True),
                                             ("fpu sse2 avx2 avx512f", False), ("fp asimd asimddp", False)])
def test_cpu_has_vnni_reads_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_vnni(str(cpuinfo)) is expected
    assert cpu_has_vnni(str(tmp_path / "missing")) is False
