"""The TF-free serving runtime: Encoder against TensorFlow, both text routes, dynamic shapes, damaged exports,
provider choice, image files, the index round trip, the CLI commands and the example app.

One tiny `dive_temde` model (64x64 pixels, K = 2, D = 16, a sketch) is exported once per module.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import WORDS, tiny_run
from tfemde.serving import Encoder, ExportFileError, SetIndex, choose_providers
from tfemde.serving.images import load_image

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a red heart", "", "Café ÉCOLE ﬁne", "cat 😀", "   ",
         " ".join(["two big green rocket cars with a happy dog"] * 4),  # longer than max_length
         "a red\x00heart after a NUL"]  # the ONNX tokenizer op reads C strings: both routes must see a space


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tfemde.export import export_run

    tmp = tmp_path_factory.mktemp("serving")
    model, tokenizer = tiny_run(tmp)
    export_dir = export_run(model, tmp / "export", tokenizer=tokenizer)
    return {"model": model, "tokenizer": tokenizer, "export": export_dir, "tmp": tmp}


def _tf_text(setup, texts):
    """TensorFlow (Keras) embeddings of texts as training computes them: fixed max_length padding."""
    model, tokenizer = setup["model"], setup["tokenizer"]
    ids, mask = tokenizer.encode(texts, model.config.max_length)
    out = model.text_encoder({"caption_ids": ids, "caption_mask": mask}, training=False)
    return out["set"].numpy(), out["sketch"].numpy()


def _tf_images(setup, images_uint8):
    import tensorflow as tf

    x = tf.cast(images_uint8, tf.float32) / 255.0  # the training pipeline's conversion
    out = setup["model"].image_encoder({"image": x}, training=False)
    return out["set"].numpy(), out["sketch"].numpy()


def _smooth_chamfer_reference(q_sets, q_sketch, i_sets, i_sketch, alpha, weight, depth):
    """The similarity re-derived in float64, one pair at a time."""
    out = np.zeros((len(q_sets), len(i_sets)))
    for a in range(len(q_sets)):
        for b in range(len(i_sets)):
            c = alpha * q_sets[a].astype(np.float64) @ i_sets[b].astype(np.float64).T
            rows = np.log(np.exp(c).sum(axis=1)).mean() / (2 * alpha)
            cols = np.log(np.exp(c).sum(axis=0)).mean() / (2 * alpha)
            sk = np.mean([x @ y for x, y in zip(q_sketch[a].reshape(depth, -1), i_sketch[b].reshape(depth, -1))])
            out[a, b] = rows + cols + weight * sk
    return out


def _write_png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------- providers
IDLE_CPU_SCRIPT = """
import sys, time
import numpy as np
from onnx import TensorProto, helper
from tfemde.serving.providers import make_session

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])
graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = make_session(model.SerializeToString(), threads=2, spinning=sys.argv[1] == "1")
feeds = {"x": np.random.default_rng(0).random((256, 256), dtype=np.float32)}
for _ in range(10):
    session.run(None, feeds)
idle = 0.0
for _ in range(10):
    session.run(None, feeds)
    start = time.process_time()
    time.sleep(0.05)
    idle += time.process_time() - start
print(idle)
"""


def test_sessions_spin_only_while_a_call_runs_unless_asked():
    """By default onnxruntime's threads stop spinning when a call returns: an idle session costs no CPU (with
    `spinning=True` they go on spinning between calls, as onnxruntime's own default does)."""
    def idle_cpu(spinning):
        out = subprocess.run([sys.executable, "-c", IDLE_CPU_SCRIPT, "1" if spinning else "0"], capture_output=True,
                             text=True, check=True, timeout=120)
        return float(out.stdout.strip().splitlines()[-1])

    assert idle_cpu(False) < 0.02
    assert idle_cpu(True) > 0.05


def test_choose_providers_with_fake_lists():
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert choose_providers([cpu]) == [cpu]
    assert choose_providers(["AzureExecutionProvider", cpu]) == [cpu]
    assert choose_providers([cuda, cpu]) == [cuda, cpu]
    assert choose_providers(["TensorrtExecutionProvider", cuda, cpu]) == [cuda, cpu]
    assert choose_providers([cuda, cpu], requested=[cpu]) == [cpu]
    assert choose_providers([cuda, cpu], requested=cuda) == [cuda, cpu]  # CPU appended as the fallback
    assert choose_providers([cuda, cpu], requested=[(cuda, {"device_id": 1})]) == [(cuda, {"device_id": 1}), cpu]
    with pytest.raises(ValueError, match="'CUDAExecutionProvider' is not available.*available: CPUExecutionProvider"):
        choose_providers([cpu], requested=[cuda])
    with pytest.raises(ValueError, match="at least one"):
        choose_providers([cpu], requested=[])


def test_a_gpu_wheel_without_cuda_is_reported_with_what_to_do(setup, monkeypatch, capsys):
    """`pip install tfemde[gpu]` leaves both onnxruntime wheels in one folder; whichever was unpacked last runs.
    When the GPU wheel is installed and CUDA is missing, Encoder.load warns and `tfemde providers` says what to do;
    with CUDA there, or without the GPU wheel, nothing is said."""
    from tfemde.cli import main
    from tfemde.serving import providers

    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    both = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    assert providers.cuda_problem([cpu], {"onnxruntime": "1.32.0"}) is None
    assert providers.cuda_problem([cuda, cpu], both) is None
    shadowed = providers.cuda_problem([cpu], both)
    assert "both installed" in shadowed and "pip uninstall -y onnxruntime onnxruntime-gpu" in shadowed
    assert "onnxruntime-gpu==1.31.1" in shadowed
    assert "CUDA 12 / cuDNN 9" in providers.cuda_problem([cpu], {"onnxruntime-gpu": "1.31.1"})

    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [cpu])  # as on a machine without CUDA
    monkeypatch.setattr(providers, "installed_onnxruntime_wheels", lambda: dict(both))
    monkeypatch.setattr("tfemde.serving.encoder.installed_onnxruntime_wheels", lambda: dict(both))
    with pytest.warns(RuntimeWarning, match="both installed"):
        Encoder.load(setup["export"])
    assert main(["providers"]) == 1
    captured = capsys.readouterr()
    assert "serving uses: CPUExecutionProvider" in captured.out and "pip uninstall" in captured.err
    monkeypatch.setattr(providers, "installed_onnxruntime_wheels", lambda: {"onnxruntime": "1.32.0"})
    assert main(["providers"]) == 0


def test_encoder_uses_the_chosen_providers(setup):
    import onnxruntime as ort

    encoder = Encoder.load(setup["export"])
    assert encoder.providers == choose_providers(ort.get_available_providers())
    encoder.encode_texts(["a red car"])
    assert encoder._session("text.onnx").get_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="not available"):
        Encoder.load(setup["export"], providers=["NoSuchExecutionProvider"])


# ---------------------------------------------------------------------------------------------- end to end, no TF
_NO_TF_SCRIPT = textwrap.dedent("""
    import json, sys
    BLOCKED = ("tensorflow", "keras", "tf2onnx", "tensorflow_text", "onnx")
    attempts = []

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    import numpy as np
    from tfemde.serving import Encoder, SetIndex

    job = json.loads(sys.argv[1])
    out = {}
    for route in ("sentencepiece", "e2e"):
        encoder = Encoder.load(job["export"], text_route=route)
        texts = encoder.encode_texts(job["texts"], batch_size=4)
        out[f"{route}_sets"], out[f"{route}_sketches"] = texts.sets, texts.sketches
    images = encoder.encode_images(np.load(job["images"]), batch_size=3)
    from_files = encoder.encode_images(job["paths"], batch_size=2)
    index = SetIndex(**encoder.similarity_kwargs)
    index.add(from_files, ids=[f"item{i}" for i in range(len(job["paths"]))])
    ids, scores = index.search(texts, k=3)
    index.save(job["index"])
    ids2, scores2 = SetIndex.load(job["index"]).search(texts, k=3)
    np.savez(job["out"], image_sets=images.sets, image_sketches=images.sketches, file_sets=from_files.sets,
             file_sketches=from_files.sketches, ids=ids, scores=scores, ids2=ids2, scores2=scores2, **out)
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
    print(json.dumps({"attempts": attempts, "loaded": loaded}))
""")


def test_serving_end_to_end_without_tensorflow(setup, tmp_path):
    """Load, encode strings (both routes) and images (array and files), index, save, reload, search: no TF."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    paths = [_write_png(tmp_path / f"img{i}.png", images[i]) for i in range(5)]
    np.save(tmp_path / "images.npy", images)
    job = {"export": str(setup["export"]), "texts": TEXTS, "images": str(tmp_path / "images.npy"), "paths": paths,
           "index": str(tmp_path / "index.npz"), "out": str(tmp_path / "out.npz")}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _NO_TF_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"attempts": [], "loaded": []}  # nothing even tried to import TF, Keras or onnx

    got = np.load(tmp_path / "out.npz")
    want_sets, want_sketches = _tf_text(setup, TEXTS)
    for route in ("sentencepiece", "e2e"):
        np.testing.assert_allclose(got[f"{route}_sets"], want_sets, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[f"{route}_sketches"], want_sketches, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["e2e_sets"], got["sentencepiece_sets"], atol=1e-6, rtol=0)  # routes agree
    image_sets, image_sketches = _tf_images(setup, images)
    for prefix in ("image", "file"):  # PNG files at the model size decode to exactly the array
        np.testing.assert_allclose(got[f"{prefix}_sets"], image_sets, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[f"{prefix}_sketches"], image_sketches, atol=1e-4, rtol=0)

    config = setup["model"].config
    scores = _smooth_chamfer_reference(want_sets, want_sketches, image_sets, image_sketches, config.alpha,
                                       config.sketch_weight, config.sketch_depth)
    np.testing.assert_allclose(got["scores"], -np.sort(-scores, axis=1)[:, :3], atol=1e-4)
    top = got["ids"]
    for row in range(len(TEXTS)):  # the returned items hold the returned scores (ties make ids ambiguous)
        picked = [int(i[4:]) for i in top[row]]
        np.testing.assert_allclose(scores[row, picked], got["scores"][row], atol=1e-4)
    np.testing.assert_array_equal(got["ids2"], got["ids"])  # saved, reloaded, searched: identical
    np.testing.assert_array_equal(got["scores2"], got["scores"])


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch_and_caption_lengths(setup, batch):
    encoder = Encoder.load(setup["export"], batch_size=32)
    rng = np.random.default_rng(batch)
    lengths = rng.integers(1, 3 * setup["model"].config.max_length, size=batch)  # short and long captions
    texts = [" ".join(rng.choice(WORDS, size=n)) for n in lengths]
    got = encoder.encode_texts(texts)
    assert got.sets.shape == (batch, 2, 16) and got.sketches.shape == (batch, 16) and got.sketch_depth == 2
    want_sets, want_sketches = _tf_text(setup, texts)
    np.testing.assert_allclose(got.sets, want_sets, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.sketches, want_sketches, atol=1e-4, rtol=0)

    images = rng.integers(0, 256, size=(batch, 64, 64, 3), dtype=np.uint8)
    got = encoder.encode_images(images)
    want_sets, want_sketches = _tf_images(setup, images)
    np.testing.assert_allclose(got.sets, want_sets, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.sketches, want_sketches, atol=1e-4, rtol=0)
    as_float = encoder.encode_images(images.astype(np.float32) / 255.0, batch_size=5)
    np.testing.assert_allclose(as_float.sets, got.sets, atol=1e-6, rtol=0)


def test_tokenize_truncates_and_pads_to_the_longest(setup):
    encoder = Encoder.load(setup["export"])
    ids, mask = encoder.tokenize(["a red car", "", TEXTS[-1]])
    want, want_mask = setup["tokenizer"].encode(["a red car", "", TEXTS[-1]], 12)
    assert ids.shape == (3, 12) and ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(mask, want_mask)
    ids, mask = encoder.tokenize(["a dog", ""])
    assert ids.shape == (2, len(setup["tokenizer"].tokenize(["a dog"])[0]))
    ids, _ = encoder.tokenize(["", " "])
    assert ids.shape == (2, 1) and not ids.any()
    empty = encoder.encode_texts([])
    assert empty.sets.shape == (0, 2, 16) and empty.sketches.shape == (0, 16)


def test_encode_token_ids_matches_encode_texts(setup):
    encoder = Encoder.load(setup["export"])
    ids, mask = setup["tokenizer"].encode(TEXTS, 12)
    a = encoder.encode_token_ids(ids)  # mask defaults to ids > 0
    b = encoder.encode_texts(TEXTS)
    np.testing.assert_allclose(a.sets, b.sets, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"caption_ids must be integer ids of shape \[N, T\]; got shape \(12,\)"):
        encoder.encode_token_ids(ids[0])
    with pytest.raises(ValueError, match=r"caption_mask must have the shape of caption_ids \(7, 12\)"):
        encoder.encode_token_ids(ids, mask[:, :3])


def test_input_errors_name_the_expected_shape_or_type(setup, tmp_path):
    encoder = Encoder.load(setup["export"])
    with pytest.raises(ValueError, match="not one string; wrap it in a list"):
        encoder.encode_texts("a red car")
    with pytest.raises(ValueError, match="item 1 is int"):
        encoder.encode_texts(["a red car", 7])
    with pytest.raises(ValueError, match=r"^texts item 0 holds a lone surrogate"):
        encoder.encode_texts(["\ud83d cat"])
    vocab = setup["tokenizer"].vocab_size
    for bad in (-1, vocab, 2**31 - 1):
        with pytest.raises(ValueError, match=rf"caption_ids must be token ids in \[0, {vocab}\) .*; got {bad}$"):
            encoder.encode_token_ids(np.array([[3, bad]]))
    with pytest.raises(ValueError, match=r"images must have shape \[N, 64, 64, 3\].*got shape \(64, 64, 3\).*"
                                         r"add a batch axis"):
        encoder.encode_images(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, 64, 64, 3\].*got shape \(2, 32, 32, 3\)"):
        encoder.encode_images(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="got dtype int32"):
        encoder.encode_images(np.zeros((2, 64, 64, 3), np.int32))
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\].*got values in \[255.0, 255.0\]"):
        encoder.encode_images(np.full((2, 64, 64, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="not one path; wrap it in a list"):
        encoder.encode_images(str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="does not exist"):
        encoder.encode_images([str(tmp_path / "missing.png")])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        encoder.encode_images([str(tmp_path / "notes.png")])
    with pytest.raises(ValueError, match=r"takes images \[N, 64, 64, 3\], not region features"):
        encoder.encode_regions(np.zeros((1, 3, 8), np.float32))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        encoder.encode_texts(["a"], batch_size=-1)
    with pytest.raises(ValueError, match="text_route must be one of"):
        Encoder.load(setup["export"], text_route="tf")


def test_e2e_route_refuses_a_process_with_tensorflow(setup):
    import tensorflow  # noqa: F401 - this pytest process has TensorFlow (the fixture built a Keras model)

    with pytest.raises(RuntimeError, match="crashes a process that has imported TensorFlow"):
        Encoder.load(setup["export"], text_route="e2e")


# ---------------------------------------------------------------------------------------------- damaged exports
def _copy(setup, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(setup["export"], target)
    return target


@pytest.mark.parametrize("name", ["image.onnx", "text.onnx", "tokenizer.model"])
def test_corrupt_file_names_the_checksum_mismatch(setup, tmp_path, name):
    export = _copy(setup, tmp_path)
    data = bytearray((export / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (export / name).write_bytes(bytes(data))
    with pytest.raises(ExportFileError, match=rf"export file '{name}' .* corrupt or was changed: its sha256 checksum "
                                              r"does not match .*same size, different content"):
        Encoder.load(export)
    (export / name).write_bytes(bytes(data[:100]))
    with pytest.raises(ExportFileError, match=rf"'{name}' .*checksum does not match.*100 bytes, expected"):
        Encoder.load(export)


def test_missing_files_and_bad_manifests(setup, tmp_path):
    export = _copy(setup, tmp_path)
    (export / "text.onnx").unlink()
    with pytest.raises(ExportFileError, match="export file 'text.onnx' is missing from"):
        Encoder.load(export)
    Encoder.load(export, verify=False)  # opening without the check is possible (sessions start on first use)

    manifest = json.loads((export / "manifest.json").read_text())
    (export / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ExportFileError, match="format version 99; this tfemde reads version 1"):
        Encoder.load(export)
    (export / "manifest.json").write_text("{not json")
    with pytest.raises(ExportFileError, match="'manifest.json' in .* is corrupt"):
        Encoder.load(export)
    (export / "manifest.json").unlink()
    with pytest.raises(ExportFileError, match="is not a tfemde export: manifest.json is missing"):
        Encoder.load(export)
    with pytest.raises(ExportFileError, match="does not exist"):
        Encoder.load(tmp_path / "nowhere")


def test_the_manifest_schema_is_typed_and_shared_by_writer_and_readers(setup, tmp_path):
    """`Manifest.from_dict` gives the fields the Encoder uses (K, D, sketch, α, λ, text and image sizes) from what
    the export wrote; a field missing or of the wrong type is one `ExportFileError` naming it, at read time."""
    from tfemde.serving.manifest import Manifest, read_manifest

    config = setup["model"].config
    spec = Manifest.from_dict(read_manifest(setup["export"]))
    assert (spec.preset, spec.set_size, spec.dim) == (config.preset, config.set_size, config.embed_dim)
    assert (spec.sketch_size, spec.sketch_depth) == (config.sketch_size, config.sketch_depth)
    assert (spec.alpha, spec.sketch_weight) == (config.alpha, config.sketch_weight)
    assert (spec.max_length, spec.vocab_size) == (config.max_length, setup["tokenizer"].vocab_size)
    assert (spec.image_input, spec.image_size, spec.region_dim, spec.int8_files) == (
        config.image_input, (config.image_size, config.image_size), None, {})
    encoder = Encoder.load(setup["export"])
    assert (encoder.set_size, encoder.dim, encoder.sketch_depth, encoder.image_size) == (
        spec.set_size, spec.dim, spec.sketch_depth, spec.image_size)

    export = _copy(setup, tmp_path)
    manifest = json.loads((export / "manifest.json").read_text())
    for path, value, message in ((("embedding", "dim"), None, "'embedding.dim' (expected int, got None)"),
                                 (("text", "max_length"), True, "'text.max_length' (expected int, got True)"),
                                 (("similarity", "alpha"), "16", "'similarity.alpha' (expected int or float"),
                                 (("image", "size"), [64], "'image.size' (expected [H, W]; got [64])")):
        broken = json.loads(json.dumps(manifest))
        if value is None:
            del broken[path[0]][path[1]]
        else:
            broken[path[0]][path[1]] = value
        (export / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ExportFileError, match=re.escape(message)):
            Encoder.load(export)


def test_verify_files_checks_the_saved_model_too(setup, tmp_path):
    from tfemde.serving import read_manifest, verify_files

    export = _copy(setup, tmp_path)
    manifest = read_manifest(export)
    verify_files(export, manifest)  # every listed file, the SavedModel included
    assert any(name.startswith("saved_model/variables/") for name in manifest["files"])
    variables = next(export.glob("saved_model/variables/variables.data-*"))
    variables.write_bytes(variables.read_bytes() + b"\0")
    with pytest.raises(ExportFileError, match=r"'saved_model/variables/variables.data-.*checksum does not match"):
        verify_files(export, manifest, ["saved_model"])
    Encoder.load(export)  # the serving runtime does not need the SavedModel


def test_manifest_paths_must_stay_inside_the_export(setup, tmp_path):
    export = _copy(setup, tmp_path)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((export / "image.onnx").read_bytes())
    manifest = json.loads((export / "manifest.json").read_text())
    record = manifest["files"]["image.onnx"]
    for name in ("../outside.onnx", str(outside), "a/../../outside.onnx", "./image.onnx", ""):
        bad = {**manifest, "files": {**manifest["files"], name: record}}
        (export / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ExportFileError, match="not a relative path inside the export folder"):
            Encoder.load(export)
    # an int8 entry must name one of the checksummed files, never a path of its own
    quantized = {**manifest, "quantized": {"image": {"of": "image.onnx", "file": "../outside.onnx"},
                                           "text": {"of": "text.onnx", "file": "text.onnx"}}}
    (export / "manifest.json").write_text(json.dumps(quantized))
    with pytest.raises(ExportFileError, match="quantized 'image' entry whose file is not one of the export's"):
        Encoder.load(export, precision="int8")
    # a listed file that is a link out of the folder is refused, not followed
    (export / "manifest.json").write_text(json.dumps(manifest))
    (export / "image.onnx").unlink()
    (export / "image.onnx").symlink_to(outside)
    with pytest.raises(ExportFileError, match="resolves to .*outside.onnx.*, outside the export folder"):
        Encoder.load(export)


def test_encoder_runs_the_bytes_it_verified(setup, tmp_path):
    """Replacing an export's files after load changes nothing: the sessions and tokenizer use the verified bytes."""
    export = _copy(setup, tmp_path)
    images = np.random.default_rng(1).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    texts = ["red square", "a blue circle"]
    expected = Encoder.load(export)
    expected_images, expected_texts = expected.encode_images(images), expected.encode_texts(texts)
    encoder = Encoder.load(export)
    from tfemde.export import export_run
    from tfemde.text import Tokenizer

    other_model, other_tokenizer = tiny_run(tmp_path, embed_dim=24)
    replacement = export_run(other_model, tmp_path / "other", tokenizer=other_tokenizer)
    for name in ("image.onnx", "text.onnx"):
        (export / name).write_bytes((replacement / name).read_bytes())
    Tokenizer.train(["completely different words here", "and more of them"] * 50, vocab_size=26).save(
        export / "tokenizer.model")
    got_images, got_texts = encoder.encode_images(images), encoder.encode_texts(texts)
    np.testing.assert_array_equal(got_images.sets, expected_images.sets)
    np.testing.assert_array_equal(got_texts.sets, expected_texts.sets)
    assert encoder.tokenizer.model_proto == setup["tokenizer"].model_proto


# ---------------------------------------------------------------------------------------------- index
def test_index_save_reload_search_identical(setup, tmp_path):
    encoder = Encoder.load(setup["export"])
    rng = np.random.default_rng(2)
    items = encoder.encode_images(rng.integers(0, 256, size=(9, 64, 64, 3), dtype=np.uint8))
    queries = encoder.encode_texts(TEXTS)
    index = SetIndex(**encoder.similarity_kwargs)
    assert encoder.similarity_kwargs == {"alpha": 16.0, "sketch_weight": 0.5}
    index.add(items, ids=[f"img{i}" for i in range(9)])
    ids, scores = index.search(queries, k=4)
    path = index.save(tmp_path / "index.bin")
    again = SetIndex.load(path)
    ids2, scores2 = again.search(queries, k=4)
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(scores2, scores)
    full = encoder.similarity(queries, items)
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :4], atol=1e-6)


# ---------------------------------------------------------------------------------------------- image files
def _format_zoo(folder, size=16):
    """Files of many kinds at the model size, each with the pixels a correct decoder must give (NumPy reference)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, size=(size, size, 4), dtype=np.uint8)
    over_white = np.rint(rgba[..., :3] * (rgba[..., 3:] / 255.0) + 255.0 * (1 - rgba[..., 3:] / 255.0))
    grey16 = rng.integers(0, 65536, size=(size, size), dtype=np.uint16)
    grey = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 4, size=(size, size), dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    palette_rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])[np.asarray(palette)]
    files = {}
    Image.fromarray(rgba).save(folder / "rgba.png")
    files["rgba.png"] = over_white
    Image.fromarray(grey16).save(folder / "grey16.png")  # Pillow keeps 16 bits (mode I;16)
    files["grey16.png"] = np.repeat(np.rint(grey16 / 257.0)[..., None], 3, axis=-1)
    Image.fromarray(grey).save(folder / "grey.png")
    files["grey.png"] = np.repeat(grey[..., None], 3, axis=-1)
    palette.save(folder / "palette.png", transparency=3)  # colour 3 is transparent: white
    files["palette.png"] = palette_rgb
    Image.fromarray(rgba).save(folder / "alpha.webp", lossless=True)
    files["alpha.webp"] = over_white
    Image.fromarray(rgba[..., :3]).save(folder / "photo.jpg", quality=95)
    files["photo.jpg"] = None  # lossy: only training == serving is checked
    Image.fromarray(rgba[..., :3]).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    files["cmyk.jpg"] = None
    palette.save(folder / "frames.gif", save_all=True, append_images=[palette.rotate(90)], transparency=3)
    files["frames.gif"] = palette_rgb  # the first frame
    Image.fromarray(rgba).resize((40, 23)).save(folder / "resized.png")
    files["resized.png"] = None
    return files


def test_one_image_decoding_for_training_and_serving(tmp_path):
    """Every format decodes to the same pixels in the training pipeline and in the TF-free runtime, and to the
    NumPy reference where one exists (16-bit grey scaled by 1/257, transparency over white, first GIF frame)."""
    from tfemde.data import Dataset, eval_dataset
    from tfemde.text import Tokenizer

    files = _format_zoo(tmp_path)
    names = sorted(files)
    paths = [str(tmp_path / name) for name in names]
    dataset = Dataset("zoo", captions=[f"image {i}" for i in range(len(names))], caption_item=np.arange(len(names)),
                      item_split=["train"] * len(names), item_group=np.arange(len(names)), image_paths=paths)
    tokenizer = Tokenizer.train(dataset.captions * 5, vocab_size=19)
    batches = eval_dataset(dataset, tokenizer, batch_size=4, image_size=16).items
    training = np.rint(np.concatenate([b["image"].numpy() for b in batches]) * 255).astype(np.uint8)
    for name, path, trained in zip(names, paths, training):
        served = load_image(path, 16)
        np.testing.assert_array_equal(served, trained, err_msg=name)
        if files[name] is not None:
            np.testing.assert_array_equal(served, files[name].astype(np.uint8), err_msg=name)


def test_image_size_limit_and_unreadable_files(tmp_path):
    from PIL import Image

    Image.new("1", (9000, 5000)).save(tmp_path / "bomb.png")  # a few kB that would decode to 45 megapixels
    with pytest.raises(ValueError, match=r"bomb\.png' is 9000 x 5000 = 45,000,000 pixels, more than the limit of "
                                         r"40,000,000"):
        load_image(tmp_path / "bomb.png", 16)
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20), (10, 20, 30)).save(small)
    with pytest.raises(ValueError, match="more than the limit of 100"):
        load_image(small, 16, max_pixels=100)
    big_jpeg = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (200, 100, 50)).save(big_jpeg)
    assert load_image(big_jpeg, 16, max_pixels=400_000).shape == (16, 16, 3)  # decoded at 1/8 scale, not refused
    (tmp_path / "broken.png").write_bytes(small.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"broken\.png' is not an image Pillow can read"):
        load_image(tmp_path / "broken.png", 16)


# ---------------------------------------------------------------------------------------------- CLI and app
def test_cli_embed_index_search(setup, tmp_path, capsys):
    from tfemde.cli import main

    export = str(setup["export"])
    (tmp_path / "texts.txt").write_text("a red heart\ncat on a rocket\n", encoding="utf-8")
    rng = np.random.default_rng(4)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        _write_png(folder / f"p{i}.png", rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    assert main(["embed", export, "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "t.npz")]) == 0
    encoder = Encoder.load(export)
    with np.load(tmp_path / "t.npz") as z:
        assert z["ids"].tolist() == ["a red heart", "cat on a rocket"] and int(z["sketch_depth"]) == 2
        np.testing.assert_allclose(z["sets"], encoder.encode_texts(["a red heart", "cat on a rocket"]).sets,
                                   atol=1e-6)
    assert main(["embed", export, "--images", str(folder), "--out", str(tmp_path / "i.npz"),
                 "--text-route", "sentencepiece"]) == 0
    with np.load(tmp_path / "i.npz") as z:
        assert z["ids"].tolist() == ["p0.png", "p1.png", "p2.png", "p3.png"] and z["sets"].shape == (4, 2, 16)
    assert main(["index", export, "--images", str(folder), "--out", str(tmp_path / "idx")]) == 0
    assert len(SetIndex.load(tmp_path / "idx")) == 4

    # one unreadable file is reported and skipped; --strict stops at it and writes nothing
    broken = tmp_path / "with_broken"
    shutil.copytree(folder, broken)
    (broken / "p1.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["embed", export, "--images", str(broken), "--out", str(tmp_path / "b.npz")]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 of 4 images" in err and "p1.png" in err, err
    with np.load(tmp_path / "b.npz") as z, np.load(tmp_path / "i.npz") as full:
        assert z["ids"].tolist() == ["p0.png", "p2.png", "p3.png"]
        np.testing.assert_allclose(z["sets"], full["sets"][[0, 2, 3]], atol=1e-6)
    assert main(["index", export, "--images", str(broken), "--out", str(tmp_path / "strict.idx"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p1.png' is not an image Pillow can read" in err[0], err
    assert not (tmp_path / "strict.idx").exists()
    capsys.readouterr()
    assert main(["search", export, "--index", str(tmp_path / "idx"), "--query", "a red heart", "--query", "car",
                 "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ids, scores = SetIndex.load(tmp_path / "idx").search(encoder.encode_texts(["a red heart", "car"]), k=2)
    assert lines[0] == "'a red heart':" and lines[3] == "'car':" and len(lines) == 6
    assert lines[1].split()[-1] == ids[0, 0] and float(lines[1].split()[1]) == pytest.approx(scores[0, 0], abs=1e-4)

    assert main(["index", export, "--data", "emoji", "--split", "test", "--out", str(tmp_path / "emoji.idx")]) == 0
    emoji = SetIndex.load(tmp_path / "emoji.idx")
    assert len(emoji) > 100 and emoji.ids.dtype.kind == "U"
    # the approximate index: a folder, searched by the same command. HNSW may leave a few keys unreachable (its
    # graph is built by several threads, in a different order each run), so its results are checked as exact
    # scores of the items it found, most of them the exact top 5; a flat index with more neighbours than keys
    # makes every item a candidate and must rank exactly as the exact index.
    queries = ["a red heart", "car", "smiling face", "flag"]
    exact_ids, exact_scores = emoji.search(encoder.encode_texts(queries), k=5)
    all_ids, all_scores = emoji.search(encoder.encode_texts(queries), k=len(emoji))
    score_of = [dict(zip(i.tolist(), s.tolist())) for i, s in zip(all_ids, all_scores)]

    def search_out(index_path):
        capsys.readouterr()
        assert main(["search", export, "--index", index_path, *sum([["--query", q] for q in queries], []),
                     "-k", "5"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines() if not line.startswith("'")]
        return np.array([r[-1] for r in rows]).reshape(4, 5), np.array([float(r[1]) for r in rows]).reshape(4, 5)

    assert main(["index", export, "--data", "emoji", "--split", "test", "--ann", "hnsw", "--neighbours", "100000",
                 "--out", str(tmp_path / "emoji.ann")]) == 0
    assert "FAISS HNSW32 over" in capsys.readouterr().out
    ids, scores = search_out(str(tmp_path / "emoji.ann"))
    np.testing.assert_allclose(scores, [[score_of[q][i] for i in row] for q, row in enumerate(ids)], atol=1e-4)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids.tolist(), exact_ids.tolist())]) >= 0.75
    # element keys with the item's sketch appended: with more neighbours than keys, the exact ranking again
    assert main(["index", export, "--data", "emoji", "--split", "test", "--ann", "flat", "--key", "elements+sketch",
                 "--neighbours", "100000", "--out", str(tmp_path / "emoji_sk.ann")]) == 0
    assert json.loads((tmp_path / "emoji_sk.ann" / "manifest.json").read_text())["key"] == "elements+sketch"
    ids, scores = search_out(str(tmp_path / "emoji_sk.ann"))
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-4)
    # float16 storage: the same best scores within float16's rounding (near ties may swap places)
    # refined candidates from a PQ index: FAISS's 4 x 200 keys by their codes, the best 200 by the stored sets
    assert main(["index", export, "--data", "emoji", "--split", "test", "--ann", "ivfpq",
                 "--neighbours", "200", "--refine", "4", "--out", str(tmp_path / "emoji_pq.ann")]) == 0
    assert json.loads((tmp_path / "emoji_pq.ann" / "manifest.json").read_text())["refine"] == 4
    assert search_out(str(tmp_path / "emoji_pq.ann"))[0].shape == (4, 5)
    assert main(["index", export, "--data", "emoji", "--split", "test", "--ann", "flat", "--float16",
                 "--out", str(tmp_path / "emoji16.ann")]) == 0
    assert json.loads((tmp_path / "emoji16.ann" / "manifest.json").read_text())["store_dtype"] == "float16"
    ids, scores = search_out(str(tmp_path / "emoji16.ann"))
    assert set(ids.reshape(-1)) <= set(emoji.ids.tolist())
    np.testing.assert_allclose(scores, exact_scores, atol=3e-3)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a user's file")
    assert main(["index", export, "--data", "emoji", "--split", "test", "--ann", "flat",
                 "--out", str(tmp_path / "mine")]) == 2
    assert "not an AnnSetIndex folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "a user's file"

    assert main(["search", export, "--index", str(tmp_path / "missing"), "--query", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err

    # an index remembers its export: another export (here a copy whose manifest differs) is refused, unless asked
    other = tmp_path / "other_export"
    shutil.copytree(export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "2000-01-01T00:00:00+00:00"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert SetIndex.load(tmp_path / "idx").export_digest == encoder.export_digest != Encoder.load(other).export_digest
    capsys.readouterr()
    assert main(["search", str(other), "--index", str(tmp_path / "idx"), "--query", "car"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was built with another export" in err[0] and "--allow-other-export" in err[0], err
    assert main(["search", str(other), "--index", str(tmp_path / "idx"), "--query", "car",
                 "--allow-other-export"]) == 0
    assert main(["embed", str(tmp_path), "--texts", str(tmp_path / "texts.txt"), "--out", "x.npz"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


@pytest.fixture
def app_index(setup, tmp_path):
    encoder = Encoder.load(setup["export"])
    rng = np.random.default_rng(5)
    index = SetIndex(**encoder.similarity_kwargs)
    index.add(encoder.encode_images(rng.integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)),
              ids=[f"item{i}" for i in range(6)])
    return encoder, index, index.save(tmp_path / "app.idx")


def test_serve_app_http_on_loopback(setup, app_index):
    encoder, index, path = app_index
    app = subprocess.Popen([sys.executable, str(ROOT / "export" / "serve_app.py"), str(setup["export"]), path,
                            "--port", "0", "-k", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = app.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line + app.stderr.read()
        base = line.split()[-1]
        with urllib.request.urlopen(f"{base}/search?q={urllib.parse.quote('a red heart')}&k=2", timeout=30) as r:
            got = json.loads(r.read())
        ids, scores = index.search(encoder.encode_texts(["a red heart"]), k=2)
        assert [x["id"] for x in got["results"]] == ids[0].tolist()
        np.testing.assert_allclose([x["score"] for x in got["results"]], scores[0], atol=1e-5)
        request = urllib.request.Request(f"{base}/search", data=json.dumps({"queries": ["car", "dog"]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert [len(x) for x in json.loads(r.read())["results"]] == [3, 3]
        with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
            assert json.loads(r.read())["items"] == 6
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(f"{base}/search?q=x&k=0", timeout=30)
        _hostile_requests(base)
    finally:
        app.terminate()
        app.wait(timeout=30)


def _raw_http(base, data, timeout=30):
    """Send raw bytes to the app; `(status, JSON payload)` of its answer."""
    import socket

    host, port = base.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/"):  # http.server answers an unparsable request line as HTTP/0.9: body only
        return 400, json.loads(answer)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _hostile_requests(base):
    """A half-sent request holds only its own connection; malformed requests get a 4xx JSON error, never a reset."""
    import socket
    import time

    host, port = base.rsplit("/", 1)[-1].split(":")
    stalled = socket.create_connection((host, int(port)), timeout=30)
    stalled.sendall(b"POST /search HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"queries\"")  # never finished
    try:
        started = time.perf_counter()
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:  # answered while the other one waits
            assert json.loads(r.read())["status"] == "ok"
        assert time.perf_counter() - started < 5
        def post(body, length=None):
            length = str(len(body)) if length is None else length
            return _raw_http(base, b"POST /search HTTP/1.1\r\nContent-Length: " + length.encode() + b"\r\n\r\n" + body)

        cases = {
            "k huge": post(b'{"queries": ["car"], "k": 1e999}'),
            "k float": post(b'{"queries": ["car"], "k": 2.5}'),
            "bad length": post(b'{"queries": ["car"]}', length="abc"),
            "nested": post(b"[" * 100000 + b"]" * 100000),
            "not an object": post(b'["car"]'),
            "too many queries": post(json.dumps({"queries": [""] * 100000}).encode()),
            "not JSON": post(b"{queries"),
            "GET k": _raw_http(base, b"GET /search?q=car&k=1e999 HTTP/1.1\r\n\r\n"),
            "bad request line": _raw_http(base, b"NONSENSE\r\n\r\n"),
        }
        for name, (status, payload) in cases.items():
            assert 400 <= status < 500 and isinstance(payload.get("error"), str), (name, status, payload)
        assert "at most 256 queries" in cases["too many queries"][1]["error"]
        assert "k must be an integer between 1 and 1000" in cases["k huge"][1]["error"]
    finally:
        stalled.close()


def test_serve_app_stdin(setup, app_index):
    encoder, index, path = app_index
    done = subprocess.run([sys.executable, str(ROOT / "export" / "serve_app.py"), str(setup["export"]), path,
                           "--stdin", "-k", "2"], input="a red heart\n\ncaf\xe9\ncat\n".encode("latin-1"),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    lines = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert lines[1]["line"] == 3 and "UnicodeDecodeError" in lines[1]["error"]  # a non-UTF-8 line: an error line
    answers = [lines[0], lines[2]]
    assert [a["query"] for a in answers] == ["a red heart", "cat"]
    ids, _ = index.search(encoder.encode_texts(["a red heart", "cat"]), k=2)
    assert [[x["id"] for x in a["results"]] for a in answers] == ids.tolist()


def test_serve_app_answers_from_an_ann_folder(setup, app_index, tmp_path):
    """The application opens an AnnSetIndex folder as it opens a SetIndex file, and ranks the same way."""
    from tfemde.serving import AnnSetIndex

    encoder, index, _ = app_index
    ann = AnnSetIndex(**encoder.similarity_kwargs, factory="Flat")
    ann.add(index.embeddings, ids=index.ids)
    folder = ann.save(tmp_path / "app.ann")
    done = subprocess.run([sys.executable, str(ROOT / "export" / "serve_app.py"), str(setup["export"]), folder,
                           "--stdin", "-k", "3"], input=b"a red heart\ncat\n", capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    answers = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    ids, _ = index.search(encoder.encode_texts(["a red heart", "cat"]), k=3)
    assert [[x["id"] for x in a["results"]] for a in answers] == ids.tolist()
