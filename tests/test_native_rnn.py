"""tfemde.export.native_rnn: the BiGRUs of an exported encoder as ONNX `GRU` ops.

Both forms (the `GRU` op for float32 graphs, the lean `Loop` the int8 graphs are quantized from) are checked against
Keras and against a GRU written out in NumPy (ONNX's equations with `linear_before_reset=1`, one
direction at a time over each sequence's valid steps), on right-padded masks of every length from empty to full;
the text tower (states used) and GPO (sequence used) both go through it, and an unsupported layer falls back to
tf2onnx's `Loop`.
"""

import numpy as np
import pytest

from helpers import tiny_run


def _op_types(proto):
    return {node.op_type for node in proto.graph.node}


def _session(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _masks(rng, batch, length):
    lengths = rng.integers(0, length + 1, size=batch)
    lengths[0], lengths[-1] = length, 0  # a full row and an empty one
    return np.arange(length)[None, :] < lengths[:, None]


def _numpy_gru(x, lengths, kernel, recurrent, bias, reverse):
    """One Keras GRU direction (reset_after) over the first `lengths[b]` steps of each row; zeros elsewhere."""
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    units = recurrent.shape[0]
    batch, steps, _ = x.shape
    outputs, states = np.zeros((batch, steps, units)), np.zeros((batch, units))
    for b in range(batch):
        h = np.zeros(units)
        order = range(lengths[b] - 1, -1, -1) if reverse else range(lengths[b])
        for t in order:
            xw = x[b, t] @ kernel + bias[0]
            hu = h @ recurrent + bias[1]
            z = sigmoid(xw[:units] + hu[:units])
            r = sigmoid(xw[units:2 * units] + hu[units:2 * units])
            candidate = np.tanh(xw[2 * units:] + r * hu[2 * units:])
            h = z * h + (1 - z) * candidate
            outputs[b, t] = h
        states[b] = h
    return outputs, states


@pytest.fixture(scope="module")
def bigru_model():
    """A functional model around one `AveragedBiGRU` with states, with random (not zero) biases."""
    import keras

    from tfemde.layers import AveragedBiGRU

    inputs = keras.Input((None, 5), name="x")
    mask = keras.Input((None,), dtype="bool", name="mask")
    layer = AveragedBiGRU(6, return_state=True, name="bigru")
    sequence, forward, backward = layer(inputs, mask=mask)
    model = keras.Model({"x": inputs, "mask": mask}, {"sequence": sequence, "forward": forward, "backward": backward})
    rng = np.random.default_rng(1)
    for gru in (layer.forward_layer, layer.backward_layer):
        gru.cell.bias.assign(rng.normal(scale=0.5, size=gru.cell.bias.shape).astype("float32"))
    return model, layer


def _convert(model, recurrence="gru"):
    import tensorflow as tf

    from tfemde.export.native_rnn import convert_encoder

    specs = [tf.TensorSpec([None, None, 5], tf.float32, name="x"), tf.TensorSpec([None, None], tf.bool, name="mask")]
    fn = tf.function(lambda x, mask: dict(model({"x": x, "mask": mask}, training=False)), input_signature=specs)
    return convert_encoder(fn, specs, model, opset=17, what="test model", recurrence=recurrence)


@pytest.mark.parametrize("form", ["gru", "scan"])
def test_bigru_as_onnx_gru_or_lean_scan_matches_keras_and_numpy(bigru_model, form):
    from tfemde.export.native_rnn import LEAN_SCAN, NATIVE

    model, layer = bigru_model
    proto, recurrence = _convert(model, form)
    assert recurrence == {"gru": NATIVE, "scan": LEAN_SCAN}[form]
    assert ("GRU" in _op_types(proto)) == (form == "gru") and ("Scan" in _op_types(proto)) == (form == "scan")
    assert "Loop" not in _op_types(proto)
    assert [v.name for v in proto.graph.input] == ["x", "mask"]
    assert sorted(v.name for v in proto.graph.output) == ["backward", "forward", "sequence"]
    session = _session(proto)
    rng = np.random.default_rng(0)
    forward_cell, backward_cell = layer.forward_layer.cell, layer.backward_layer.cell
    for batch, length in ((1, 1), (4, 7), (6, 3)):
        x = rng.normal(size=(batch, length, 5)).astype(np.float32)
        mask = _masks(rng, batch, length)
        got = dict(zip(["sequence", "forward", "backward"], session.run(["sequence", "forward", "backward"],
                                                                        {"x": x, "mask": mask})))
        want = {k: np.asarray(v) for k, v in model({"x": x, "mask": mask}, training=False).items()}
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)
        lengths = mask.sum(1)
        fw_out, fw_state = _numpy_gru(x, lengths, *(np.asarray(v) for v in forward_cell.weights), reverse=False)
        bw_out, bw_state = _numpy_gru(x, lengths, *(np.asarray(v) for v in backward_cell.weights), reverse=True)
        np.testing.assert_allclose(got["sequence"], (fw_out + bw_out) / 2, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["forward"], fw_state, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["backward"], bw_state, atol=1e-5, rtol=0)
        assert not got["sequence"][-1].any() and not got["forward"][-1].any()  # the empty row


def test_unsupported_layer_keeps_the_loop(bigru_model, monkeypatch):
    from tfemde.export.native_rnn import LOOP

    model, layer = bigru_model
    monkeypatch.setattr(layer.backward_layer.cell, "reset_after", False)
    proto, recurrence = _convert(model)
    assert recurrence.startswith(LOOP) and "reset_after=False" in recurrence
    assert "Loop" in _op_types(proto) and "GRU" not in _op_types(proto)


def test_unknown_recurrence_is_refused(bigru_model):
    with pytest.raises(ValueError, match="recurrence must be one of 'gru', 'scan', 'tf2onnx'; got 'lstm'"):
        _convert(bigru_model[0], "lstm")


def test_native_and_loop_exports_agree_with_keras(tmp_path):
    """vse_infty on pixels: GPO's BiGRU in the image tower (sequence only), the text tower's BiGRU (states too)."""
    import json

    import onnx

    from tfemde.export import export_run

    model, tokenizer = tiny_run(tmp_path, preset="vse_infty")
    native = export_run(model, tmp_path / "native", tokenizer=tokenizer, quantize=True)
    loop = export_run(model, tmp_path / "loop", tokenizer=tokenizer, native_rnn=False)
    recurrence = json.loads((native / "manifest.json").read_text(encoding="utf-8"))["recurrence"]
    assert recurrence == {"image.onnx": "onnx GRU", "text.onnx": "onnx GRU", "text_e2e.onnx": "onnx GRU",
                          "image.int8.onnx": "onnx Scan (tfemde)", "text.int8.onnx": "onnx Scan (tfemde)",
                          "image.int8.vnni.onnx": "onnx Scan (tfemde)", "text.int8.vnni.onnx": "onnx Scan (tfemde)"}
    assert not (native / ".scan.text.onnx").exists()
    for name in ("image.onnx", "text.onnx"):
        assert "GRU" in _op_types(onnx.load(str(native / name))) and "Loop" not in _op_types(onnx.load(str(native / name)))
        assert "Loop" in _op_types(onnx.load(str(loop / name))) and "GRU" not in _op_types(onnx.load(str(loop / name)))
        assert "Scan" in _op_types(onnx.load(str(native / name.replace(".onnx", ".int8.onnx"))))
    rng = np.random.default_rng(3)
    image = {"image": rng.random((3, 64, 64, 3), dtype=np.float32)}
    mask = _masks(rng, 5, 9)
    text = {"caption_ids": np.where(mask, rng.integers(1, tokenizer.vocab_size, size=mask.shape), 0).astype(np.int32),
            "caption_mask": mask}
    for name, feeds, encoder in (("image.onnx", image, model.image_encoder), ("text.onnx", text, model.text_encoder)):
        want = np.asarray(encoder(feeds, training=False)["set"])
        for folder in (native, loop):
            got = _session(onnx.load(str(folder / name))).run(["set"], feeds)[0]
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{folder.name}/{name}")
