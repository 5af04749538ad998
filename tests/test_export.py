"""tfemde.export: the export folder and its manifest, ONNX names and dynamic axes, parity of ONNX and the SavedModel
with Keras, and the self-checks that refuse a bad export (unsupported ops, mismatches) without touching out_dir.

One tiny run folder (`vse` on 36 x 24 region features: K = 1, no sketch) is exported once per module with the CLI;
`tests/test_serving.py` exports the other kind (pixels, K = 2, with a sketch) and checks it from the serving side.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tfemde.serving import manifest as mf

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a man woman dog cat on the beach riding horse red blue small playing with ball street".split()


def _write_run(folder, preset="vse", **overrides):
    """A complete run folder (config.json, tokenizer.model, best.keras) of an untrained tiny model."""
    from tfemde.models import build_dual_encoder, save_model
    from tfemde.text import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokenizer = Tokenizer.train([" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(300)],
                                vocab_size=40)
    sizes = dict(image_input="regions", num_regions=36, region_dim=24, embed_dim=16, word_dim=8,
                 vocab_size=tokenizer.vocab_size, max_length=10)
    sizes.update(overrides)
    model = build_dual_encoder(preset, **sizes)
    model.config.save(folder / "config.json")
    tokenizer.save(folder / "tokenizer.model")
    save_model(model, folder / "best.keras")
    return model, tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tfemde.cli import main

    tmp = tmp_path_factory.mktemp("export")
    model, tokenizer = _write_run(tmp / "run")
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "export")]) == 0
    return {"model": model, "tokenizer": tokenizer, "run": tmp / "run", "dir": tmp / "export", "tmp": tmp}


def _keras(encoder, feeds):
    import keras

    return {k: keras.ops.convert_to_numpy(v) for k, v in encoder(feeds, training=False).items()}


def _region_feeds(rng, batch, count, dim=24):
    mask = rng.random((batch, count)) < 0.7
    mask[:, 0] = True
    return {"regions": rng.normal(size=(batch, count, dim)).astype(np.float32), "region_mask": mask}


def _caption_feeds(rng, batch, length, vocab):
    lengths = rng.integers(0, length + 1, size=batch)
    lengths[0] = length
    mask = np.arange(length)[None, :] < lengths[:, None]
    return {"caption_ids": np.where(mask, rng.integers(1, vocab, size=(batch, length)), 0).astype(np.int32),
            "caption_mask": mask}


# ---------------------------------------------------------------------------------------------- folder + manifest
def test_export_folder_and_manifest(exported):
    folder, model, tokenizer = exported["dir"], exported["model"], exported["tokenizer"]
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for name in ("image.onnx", "text.onnx", "text_e2e.onnx", "tokenizer.model", "manifest.json",
                 "saved_model/saved_model.pb"):
        assert name in names
    assert (folder / "tokenizer.model").read_bytes() == tokenizer.model_proto
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary folder was moved into place, nothing else left behind

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == "tfemde.export" and manifest["version"] == 1 and manifest["opset"] == 17
    # every other file is listed with its size and a sha256 recomputed here
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, record in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    config = model.config
    assert manifest["embedding"] == {**manifest["embedding"], "set_size": 1, "dim": 16, "sketch": False,
                                     "sketch_size": 0, "sketch_depth": None}
    assert manifest["similarity"]["alpha"] == config.alpha and manifest["similarity"]["sketch_weight"] == 0.0
    assert manifest["text"]["max_length"] == 10 and manifest["text"]["vocab_size"] == tokenizer.vocab_size
    assert manifest["text"]["normalization"] == "nmt_nfkc_cf"
    assert manifest["image"]["input"] == "regions" and manifest["image"]["region_dim"] == 24
    assert manifest["config"] == config.to_dict() and manifest["preset"] == "vse"
    assert manifest["recurrence"] == {"image.onnx": None, "text.onnx": "onnx GRU", "text_e2e.onnx": "onnx GRU"}
    image = manifest["models"]["image"]
    assert image["inputs"] == [{"name": "regions", "dtype": "float32", "shape": ["batch", "regions", 24]},
                               {"name": "region_mask", "dtype": "bool", "shape": ["batch", "regions"]}]
    assert image["outputs"] == [{"name": "set", "dtype": "float32", "shape": ["batch", 1, 16]}]
    assert [i["name"] for i in manifest["models"]["text_e2e"]["inputs"]] == ["text"]
    assert [o["name"] for o in manifest["models"]["text_e2e"]["outputs"]] == ["set", "token_ids", "token_mask"]
    assert set(manifest["saved_model"]["signatures"]) == {"encode_image", "encode_text"}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "onnxruntime-extensions",
                    "sentencepiece", "numpy"):
        assert manifest["versions"][package], package
    check = manifest["verification"]
    assert check["token_ids_equal"] is True
    assert set(check["max_abs_diff"]) == {"image.onnx", "text.onnx", "text_e2e.onnx", "saved_model"}
    assert all(0 <= v <= 1e-4 for v in check["max_abs_diff"].values())
    mf.verify_files(folder, mf.read_manifest(folder))


def test_onnx_names_types_and_dynamic_axes(exported):
    import onnx

    def signature(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type), dims))
        return out

    image = onnx.load(str(exported["dir"] / "image.onnx"))
    assert signature(image.graph.input) == [("regions", "FLOAT", ["batch", "regions", 24]),
                                            ("region_mask", "BOOL", ["batch", "regions"])]
    assert signature(image.graph.output) == [("set", "FLOAT", ["batch", 1, 16])]
    text = onnx.load(str(exported["dir"] / "text.onnx"))
    assert signature(text.graph.input) == [("caption_ids", "INT32", ["batch", "tokens"]),
                                           ("caption_mask", "BOOL", ["batch", "tokens"])]
    e2e = onnx.load(str(exported["dir"] / "text_e2e.onnx"))
    assert signature(e2e.graph.input) == [("text", "STRING", ["batch"])]
    assert [o[0] for o in signature(e2e.graph.output)] == ["set", "token_ids", "token_mask"]
    custom = [(n.op_type, n.domain) for n in e2e.graph.node if n.domain]
    assert custom == [("SentencepieceTokenizer", "ai.onnx.contrib")]
    for proto in (image, text):
        assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 17
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)


@pytest.mark.parametrize("batch,length", [(1, 3), (5, 10), (4, 23)])
def test_onnx_matches_keras_at_dynamic_shapes(exported, batch, length):
    """onnxruntime (no extensions: safe beside TensorFlow) vs the Keras encoders, fresh inputs of new shapes."""
    import onnxruntime as ort

    rng = np.random.default_rng(batch * 100 + length)
    model = exported["model"]
    image = ort.InferenceSession(str(exported["dir"] / "image.onnx"), providers=["CPUExecutionProvider"])
    feeds = _region_feeds(rng, batch, length)
    got = dict(zip(["set"], image.run(["set"], feeds)))
    np.testing.assert_allclose(got["set"], _keras(model.image_encoder, feeds)["set"], atol=1e-4, rtol=0)
    text = ort.InferenceSession(str(exported["dir"] / "text.onnx"), providers=["CPUExecutionProvider"])
    feeds = _caption_feeds(rng, batch, length, exported["tokenizer"].vocab_size)
    np.testing.assert_allclose(text.run(["set"], feeds)[0], _keras(model.text_encoder, feeds)["set"], atol=1e-4,
                               rtol=0)


def test_saved_model_signatures_match_keras(exported):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported["dir"] / "saved_model"))
    assert {"encode_image", "encode_text"} <= set(loaded.signatures)
    image, text = loaded.signatures["encode_image"], loaded.signatures["encode_text"]
    assert sorted(image.structured_input_signature[1]) == ["region_mask", "regions"]
    assert sorted(text.structured_input_signature[1]) == ["caption_ids", "caption_mask"]
    rng = np.random.default_rng(7)
    model = exported["model"]
    for batch, length in ((1, 36), (3, 11)):
        feeds = _region_feeds(rng, batch, length)
        out = image(**{k: tf.constant(v) for k, v in feeds.items()})
        assert sorted(out) == ["set"]
        np.testing.assert_allclose(out["set"].numpy(), _keras(model.image_encoder, feeds)["set"], atol=1e-5, rtol=0)
        feeds = _caption_feeds(rng, batch, length // 2 + 1, exported["tokenizer"].vocab_size)
        out = text(**{k: tf.constant(v) for k, v in feeds.items()})
        np.testing.assert_allclose(out["set"].numpy(), _keras(model.text_encoder, feeds)["set"], atol=1e-5, rtol=0)


def test_serving_a_region_model_without_sketch(exported):
    """The Encoder on this export: region features in, sets of one element, no sketch, λ = 0."""
    from tfemde.serving import Encoder, SetIndex

    encoder = Encoder.load(exported["dir"])
    assert encoder.image_input == "regions" and encoder.image_size is None and encoder.sketch_size == 0
    assert encoder.similarity_kwargs == {"alpha": exported["model"].config.alpha, "sketch_weight": 0.0}
    rng = np.random.default_rng(11)
    feeds = _region_feeds(rng, 5, 36)
    items = encoder.encode_regions(feeds["regions"], feeds["region_mask"], batch_size=2)
    assert items.sets.shape == (5, 1, 16) and items.sketches is None
    np.testing.assert_allclose(items.sets, _keras(exported["model"].image_encoder, feeds)["set"], atol=1e-4)
    all_valid = encoder.encode_images(feeds["regions"])  # region models take features in encode_images too
    want = _keras(exported["model"].image_encoder, {**feeds, "region_mask": np.ones((5, 36), bool)})["set"]
    np.testing.assert_allclose(all_valid.sets, want, atol=1e-4)
    texts = ["a dog on the beach", "", "a man riding a horse"]
    queries = encoder.encode_texts(texts)
    ids, mask = exported["tokenizer"].encode(texts, 10)
    want = _keras(exported["model"].text_encoder, {"caption_ids": ids, "caption_mask": mask})["set"]
    np.testing.assert_allclose(queries.sets, want, atol=1e-4)
    index = SetIndex(**encoder.similarity_kwargs)
    index.add(items)
    found, scores = index.search(queries, k=5)
    cosines = want[:, 0] @ items.sets[:, 0].T  # K = 1 on both sides: Smooth-Chamfer is the cosine
    np.testing.assert_allclose(scores, -np.sort(-cosines, axis=1), atol=1e-4)
    with pytest.raises(ValueError, match=r"takes region features \[N, R, 24\] float32, not image files"):
        encoder.encode_images(["photo.jpg"])
    with pytest.raises(ValueError, match=r"regions must be float features of shape \[N, R, 24\]; got shape "
                                         r"\(5, 36, 8\)"):
        encoder.encode_regions(np.zeros((5, 36, 8), np.float32))
    with pytest.raises(ValueError, match=r"region_mask must have shape \[N, R\] = \(5, 36\); got shape \(5, 3\)"):
        encoder.encode_regions(feeds["regions"], np.ones((5, 3), bool))


# ---------------------------------------------------------------------------------------------- self-checks
def test_unsupported_op_is_an_error():
    """Exact GELU lowers to Erfc, which tf2onnx only logs as an ERROR: the export must fail instead."""
    import tensorflow as tf

    from tfemde.export import ExportError, convert_function

    spec = [tf.TensorSpec([None, 4], tf.float32, name="x")]
    fn = tf.function(lambda x: {"y": tf.nn.gelu(x, approximate=False)}, input_signature=spec)
    with pytest.raises(ExportError, match="Erfc"):
        convert_function(fn, spec, what="exact-GELU probe")
    fine = tf.function(lambda x: {"y": tf.nn.gelu(x, approximate=True)}, input_signature=spec)
    proto = convert_function(fine, spec, dims={"x": ["batch", None], "y": ["batch", None]})
    assert [o.name for o in proto.graph.output] == ["y"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_reshape_by_dynamic_shape_after_matmul_converts():
    """`reshape(x @ W, (shape[0], shape[1], h, e))` (how attention splits heads) runs correctly in onnxruntime."""
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    from tfemde.export import convert_function

    kernel = tf.Variable(np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32))
    spec = [tf.TensorSpec([None, None, 8], tf.float32, name="x")]

    def heads(x):
        y = keras.ops.matmul(x, kernel)
        shape = keras.ops.shape(y)
        return {"y": keras.ops.transpose(keras.ops.reshape(y, (shape[0], shape[1], 3, 4)), (0, 2, 1, 3))}

    fn = tf.function(heads, input_signature=spec)
    session = ort.InferenceSession(convert_function(fn, spec).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
    want = (x @ kernel.numpy()).reshape(2, 5, 3, 4).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(session.run(["y"], {"x": x})[0], want, atol=1e-5)


def test_a_mismatch_fails_the_check(exported, monkeypatch):
    """The comparison itself: ORT outputs moved by 1e-3 (or other token ids) must be refused."""
    import tfemde.export as export
    from tfemde.export import signatures, verify

    model, tokenizer = exported["model"], exported["tokenizer"]
    image_fn, text_fn = signatures._functions(model, model.config)
    real = verify._run_onnx_subprocess
    results = real(exported["dir"], [("text.onnx", _caption_feeds(np.random.default_rng(0), 2, 4, 30), False)])
    assert set(results[0]) == {"set"}

    def shifted(folder, cases):
        out = real(folder, cases)
        out[0]["set"] = out[0]["set"] + 1e-3
        return out

    monkeypatch.setattr(verify, "_run_onnx_subprocess", shifted)
    with pytest.raises(export.ExportError, match=r"differs from TensorFlow by more than 0.0001: image.onnx: 0.001"):
        verify._verify(exported["dir"], image_fn, text_fn, model.config, tokenizer)

    def other_ids(folder, cases):
        out = real(folder, cases)
        for case, result in zip(cases, out):
            if case[0] == "text_e2e.onnx":
                result["token_ids"] = result["token_ids"] + 1
        return out

    monkeypatch.setattr(verify, "_run_onnx_subprocess", other_ids)
    with pytest.raises(export.ExportError, match="text_e2e.onnx tokenizes differently from the training tokenizer"):
        verify._verify(exported["dir"], image_fn, text_fn, model.config, tokenizer)


def test_failed_export_leaves_out_dir_untouched(exported, monkeypatch, capsys):
    import importlib.util

    import tfemde.export as export
    import tfemde.export.folder

    before = (exported["dir"] / "manifest.json").read_bytes()

    def broken(*args, **kwargs):
        raise export.ExportError("simulated converter failure")

    monkeypatch.setattr(tfemde.export.folder, "_save_saved_model", broken)
    spec = importlib.util.spec_from_file_location("export_encoders", ROOT / "export" / "export_encoders.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(exported["run"]), str(exported["dir"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tfemde export: error: export failed its checks, nothing written: simulated converter failure"]
    assert (exported["dir"] / "manifest.json").read_bytes() == before  # the earlier export is intact
    assert [p.name for p in exported["dir"].parent.iterdir() if p.name.startswith(".")] == []  # no temp folder

    fresh = exported["tmp"] / "never"
    with pytest.raises(export.ExportError):
        export.export_run(exported["run"], fresh)
    assert not fresh.exists()


def test_export_argument_errors(exported, tmp_path):
    from tfemde.export import export_run

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="exists, is not empty and is not a tfemde export"):
        export_run(exported["run"], foreign)
    with pytest.raises(ValueError, match="opset must be an int from 13 to 18"):
        export_run(exported["run"], tmp_path / "out", opset=19)
    with pytest.raises(ValueError, match="needs tokenizer="):
        export_run(exported["model"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="best.keras is missing"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text("{}")
        (tmp_path / "run" / "tokenizer.model").write_bytes(b"")
        export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_never_deletes_a_folder_that_is_not_exactly_an_export(exported, tmp_path, capsys):
    """A stray manifest.json beside a user's files, or a real export with a user's file added: refused with one
    line, every file left as it was; an untouched earlier export is still replaced."""
    from tfemde.cli import main

    lookalike = tmp_path / "thesis"
    (lookalike / "sub").mkdir(parents=True)
    (lookalike / "manifest.json").write_text("{}")
    (lookalike / "sub" / "thesis.tex").write_text("x")
    grown = tmp_path / "grown"
    shutil.copytree(exported["dir"], grown)
    (grown / "notes.txt").write_text("mine")
    empty_dir = tmp_path / "with_empty_dir"
    shutil.copytree(exported["dir"], empty_dir)
    (empty_dir / "drafts").mkdir()
    for folder in (lookalike, grown, empty_dir):
        before = sorted((p.relative_to(folder).as_posix(), p.is_dir() or p.read_bytes())
                        for p in folder.rglob("*"))
        capsys.readouterr()
        assert main(["export", str(exported["run"]), "--out", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not a tfemde export" in err[0] and str(folder) in err[0], err
        assert sorted((p.relative_to(folder).as_posix(), p.is_dir() or p.read_bytes())
                      for p in folder.rglob("*")) == before

    again = tmp_path / "again"
    shutil.copytree(exported["dir"], again)
    assert main(["export", str(exported["run"]), "--out", str(again)]) == 0
    assert json.loads((again / "manifest.json").read_text())["created"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_graph_pads_to_the_longest_caption(exported, tmp_path):
    """`tokenizer_model` alone (the front of text_e2e.onnx), run TF-free, against the sentencepiece library."""
    import subprocess
    import sys

    import onnx

    from tfemde.export import tokenizer_model

    tokenizer = exported["tokenizer"]
    onnx.save_model(tokenizer_model(tokenizer.model_proto, max_length=6), str(tmp_path / "tok.onnx"))
    texts = ["a man on the beach with a red ball and a dog", "", "dog", "Ｄｏｇ ＣＡＴ"]
    code = ("import sys, json, numpy as np\n"
            "sys.modules['tensorflow'] = None\n"
            "from tfemde.serving.providers import make_session\n"
            "s = make_session(sys.argv[1], providers=['CPUExecutionProvider'], custom_ops=True)\n"
            "for texts in (json.loads(sys.argv[2]), ['', ' ']):\n"
            "    ids, mask = s.run(None, {'text': np.array(texts, dtype=object)})\n"
            "    print(json.dumps([ids.tolist(), mask.tolist(), str(ids.dtype)]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tok.onnx"), json.dumps(texts)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    (ids, mask, dtype), (blank_ids, blank_mask, _) = [json.loads(line) for line in done.stdout.splitlines()]
    want_ids, want_mask = tokenizer.encode(texts, 6)
    width = int(want_mask.sum(axis=1).max())
    assert dtype == "int32" and width == 6
    assert ids == want_ids[:, :width].tolist() and mask == want_mask[:, :width].tolist()
    assert blank_ids == [[0], [0]] and blank_mask == [[False], [False]]  # no tokens at all: one padded column
