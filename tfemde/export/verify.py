"""An export checks itself: ONNX (onnxruntime, TensorFlow-free subprocess) and SavedModel against TensorFlow.

Two batch sizes and two sequence lengths per encoder (max abs difference ≤ `TOLERANCE`), `text_e2e.onnx`'s ids
equal to the training tokenizer's, and with int8 graphs a minimum cosine of `INT8_MIN_COSINE` per set element and
sketch row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tfemde.export.convert import ExportError
from tfemde.export.quantize import int8_name
from tfemde.export.signatures import IMAGE_SIGNATURE, TEXT_SIGNATURE
from tfemde.serving import manifest as mf

TOLERANCE = 1e-4
INT8_MIN_COSINE = 0.99
# Strings the text_e2e parity check always includes (normalisation, empty, whitespace, scripts, emoji).
_CHECK_TEXTS = ["", "  \t ", "A dog runs on the beach.", "CAFÉ naïve ﬁne ＦＵＬＬ", "猫 😀 👍🏽 мир", "<mask> <pad>"]


def _check_inputs(config, tokenizer, rng):
    """The TF/ORT comparison cases: two batch sizes × two sequence lengths per encoder, and strings for e2e."""
    max_length = config.max_length
    vocab = min(config.vocab_size, tokenizer.vocab_size)
    text = []
    for batch, length in ((1, min(3, max_length)), (3, max_length)):
        lengths = rng.integers(1, length + 1, size=batch)
        lengths[0] = length
        if batch > 2:
            lengths[-1] = 0  # a caption with no token at all must work too
        mask = np.arange(length)[None, :] < lengths[:, None]
        ids = np.where(mask, rng.integers(1, vocab, size=(batch, length)), 0).astype(np.int32)
        text.append({"caption_ids": ids, "caption_mask": mask})
    image = []
    if config.image_input == "regions":
        for batch, count in ((1, config.num_regions), (3, max(1, config.num_regions // 2 + 1))):
            mask = rng.random((batch, count)) < 0.8
            mask[:, 0] = True
            image.append({"regions": rng.normal(size=(batch, count, config.region_dim)).astype(np.float32),
                          "region_mask": mask})
    else:
        size = config.image_size
        for batch in (1, 3):
            image.append({"image": rng.random((batch, size, size, 3), dtype=np.float32)})
    normal = tokenizer.normal_ids
    long_text = tokenizer.decode(rng.choice(normal, size=(1, 2 * max_length + 3)))[0]
    short_text = tokenizer.decode(rng.choice(normal, size=(1, 3)))[0]
    strings = [[short_text], _CHECK_TEXTS + [long_text]]
    return image, text, strings


def _max_diff(got: dict, want: dict, what: str) -> float:
    worst = 0.0
    for name, value in want.items():
        if name not in got:
            raise ExportError(f"{what} has no output {name!r}; it has {sorted(got)}")
        if got[name].shape != value.shape:
            raise ExportError(f"{what} output {name!r} has shape {got[name].shape}; TensorFlow gives {value.shape}")
        if not np.isfinite(got[name]).all():
            raise ExportError(f"{what} output {name!r} is not finite")
        worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - value))) if value.size else 0.0)
    return worst


def _run_onnx_subprocess(folder: Path, cases) -> list:
    """Run ONNX cases `[(file, feeds, custom_ops)]` in a TensorFlow-free Python; returns their output dicts."""
    with tempfile.TemporaryDirectory(prefix="tfemde-check-") as work:
        work = Path(work)
        job = []
        for i, (name, feeds, custom_ops) in enumerate(cases):
            np.savez(work / f"feeds_{i}.npz", **feeds)
            job.append({"model": str(folder / name), "feeds": f"feeds_{i}.npz", "outputs": f"outputs_{i}.npz",
                        "custom_ops": custom_ops})
        (work / "job.json").write_text(json.dumps(job))
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the tfemde package
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        done = subprocess.run([sys.executable, "-m", "tfemde.serving._onnx_worker", str(work)], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise ExportError("onnxruntime could not run the exported graphs (TensorFlow-free check, exit code "
                              f"{done.returncode}): " + " | ".join(tail))
        results = []
        for entry in job:
            with np.load(work / entry["outputs"], allow_pickle=False) as z:
                results.append({k: z[k] for k in z.files})
        return results


def _min_cosine(got: dict, want: dict, sketch_depth) -> float:
    """The smallest cosine between matching set elements `[N, K, D]` and sketch rows of two output dicts."""
    pairs = [(got["set"], want["set"])]
    if "sketch" in want and sketch_depth:
        pairs.append((got["sketch"].reshape(len(got["sketch"]), sketch_depth, -1),
                      want["sketch"].reshape(len(want["sketch"]), sketch_depth, -1)))
    worst = 1.0
    for a, b in pairs:
        a, b = a.astype(np.float64), b.astype(np.float64)
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        valid = norms > 1e-12
        if valid.any():
            worst = min(worst, float(((a * b).sum(-1)[valid] / norms[valid]).min()))
    return worst


def _verify(folder: Path, image_fn, text_fn, config, tokenizer, seed: int = 0, quantized: bool = False) -> dict:
    """Compare ONNX (onnxruntime, subprocess) and the reloaded SavedModel with TensorFlow; raise on any mismatch."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    image_cases, text_cases, string_cases = _check_inputs(config, tokenizer, rng)

    def reference(fn, feeds):
        return {k: v.numpy().astype(np.float64) for k, v in fn(**feeds).items()}

    onnx_cases, wants = [], []
    for feeds in image_cases:
        onnx_cases.append((mf.IMAGE_ONNX, feeds, False))
        wants.append(reference(image_fn, feeds))
    for feeds in text_cases:
        onnx_cases.append((mf.TEXT_ONNX, feeds, False))
        wants.append(reference(text_fn, feeds))
    expected_ids = []
    for texts in string_cases:
        ids, mask = tokenizer.encode(texts, config.max_length)
        width = max(1, int(mask.sum(axis=1).max()))
        ids, mask = ids[:, :width], mask[:, :width]
        expected_ids.append((ids, mask))
        onnx_cases.append((mf.TEXT_E2E_ONNX, {"text": np.array(texts, dtype=str)}, True))
        wants.append(reference(text_fn, {"caption_ids": ids, "caption_mask": mask}))
    int8_cases = []
    if quantized:
        for name, feeds, want in zip([mf.IMAGE_ONNX] * len(image_cases) + [mf.TEXT_ONNX] * len(text_cases),
                                     image_cases + text_cases, wants):
            int8_cases.append((int8_name(name), feeds, False))
            wants.append(want)

    got = _run_onnx_subprocess(folder, onnx_cases + int8_cases)
    int8_got, got = got[len(onnx_cases):], got[:len(onnx_cases)]
    diffs = {mf.IMAGE_ONNX: 0.0, mf.TEXT_ONNX: 0.0, mf.TEXT_E2E_ONNX: 0.0, mf.SAVED_MODEL_DIR: 0.0}
    e2e = 0
    for (name, feeds, _), result, want in zip(onnx_cases, got, wants):
        if name == mf.TEXT_E2E_ONNX:
            ids, mask = expected_ids[e2e]
            e2e += 1
            if result["token_ids"].shape != ids.shape or not np.array_equal(result["token_ids"], ids) \
                    or not np.array_equal(result["token_mask"], mask):
                raise ExportError(f"{mf.TEXT_E2E_ONNX} tokenizes differently from the training tokenizer: ids "
                                  f"{result['token_ids'].tolist()} vs {ids.tolist()}")
        diffs[name] = max(diffs[name], _max_diff(result, want, name))

    loaded = tf.saved_model.load(str(folder / mf.SAVED_MODEL_DIR))
    for signature, cases in ((IMAGE_SIGNATURE, image_cases), (TEXT_SIGNATURE, text_cases)):
        fn = loaded.signatures[signature]
        for feeds in cases:
            out = {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feeds.items()}).items()}
            want = reference(image_fn if signature == IMAGE_SIGNATURE else text_fn, feeds)
            diffs[mf.SAVED_MODEL_DIR] = max(diffs[mf.SAVED_MODEL_DIR],
                                            _max_diff(out, want, f"SavedModel signature {signature!r}"))
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    if bad:
        raise ExportError("the export differs from TensorFlow by more than "
                          f"{TOLERANCE:g}: " + ", ".join(f"{k}: {v:.3g}" for k, v in bad.items()))
    int8 = {}
    for (name, _, _), result, want in zip(int8_cases, int8_got, wants[len(onnx_cases):]):
        diff = _max_diff(result, want, name)  # also checks names, shapes, finiteness
        record = int8.setdefault(name, {"min_cosine": 1.0, "max_abs_diff": 0.0})
        record["min_cosine"] = min(record["min_cosine"], _min_cosine(result, want, config.sketch_depth
                                                                     if config.sketch else None))
        record["max_abs_diff"] = max(record["max_abs_diff"], diff)
    low = {k: v["min_cosine"] for k, v in int8.items() if not v["min_cosine"] >= INT8_MIN_COSINE}
    if low:
        raise ExportError(f"the int8 graphs are too far from TensorFlow (cosine below {INT8_MIN_COSINE}): "
                          + ", ".join(f"{k}: {v:.4f}" for k, v in low.items()))
    cases = {"image": [{k: list(v.shape) for k, v in c.items()} for c in image_cases],
             "text": [{k: list(v.shape) for k, v in c.items()} for c in text_cases],
             "text_e2e": [len(s) for s in string_cases]}
    out = {"tolerance": TOLERANCE, "max_abs_diff": diffs, "token_ids_equal": True, "cases": cases,
           "onnxruntime": "CPUExecutionProvider, TensorFlow-free subprocess"}
    if quantized:
        out["int8"] = {"min_cosine_required": INT8_MIN_COSINE, **int8}
    return out
