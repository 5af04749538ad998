"""The tutorial notebooks run without error in fast mode (TFEMDE_FAST=1), and what they print is right.

Each notebook is executed with `notebooks/execute.py` (nbclient, a fresh kernel) as a copy in one temporary
folder, which is also the kernels' working directory, in order: notebook 2 exports the run notebook 1 trained
there, as in `notebooks/` (run alone, notebook 2 trains a run itself first). The committed notebooks must stay
byte for byte as they were.
"""

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def _execute_module():
    spec = importlib.util.spec_from_file_location("tfemde_notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks")


def run_notebook(workdir, name):
    """Execute `notebooks/name` into `workdir` with TFEMDE_FAST=1; returns (notebook, printed text, images)."""
    committed = (NOTEBOOKS / name).read_bytes()
    nb = _execute_module().execute(NOTEBOOKS / name, out=workdir / name, fast=True, timeout=600)
    assert (NOTEBOOKS / name).read_bytes() == committed, f"executing {name} changed the committed notebook"
    text, images = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", f"{name}: {output.get('ename')}: {output.get('evalue')}"
            if output.output_type == "stream":
                text.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                images += "image/png" in output.data
                text.append(output.data.get("text/plain", ""))
    return nb, "\n".join(text), images


def table_rows(text):
    """`{model: [7 floats]}` from the `format_metrics` tables in `text`."""
    rows = {}
    for match in re.finditer(r"^(\S+)\s+" + r"\s+".join([r"(-?\d+\.\d)"] * 7) + r"\s*$", text, re.MULTILINE):
        rows[match.group(1)] = [float(v) for v in match.groups()[1:]]
    return rows


def smooth_chamfer(query, items, alpha):
    """NumPy Smooth-Chamfer of one set `[K, D]` against item sets `[N, L, D]` (ALGORITHMS.md §3.3)."""
    cos = np.einsum("kd,nld->nkl", query.astype(np.float64), items.astype(np.float64))
    lse = lambda x, axis: np.log(np.exp(alpha * x).sum(axis=axis))  # noqa: E731
    return lse(cos, 2).mean(axis=1) / (2 * alpha) + lse(cos, 1).mean(axis=1) / (2 * alpha)


def sketch_cosine(query, items, depth):
    """Mean over the `depth` partitionings of the row cosines of flattened sketches `[S]` and `[N, S]`."""
    q = query.astype(np.float64).reshape(depth, -1)
    x = items.astype(np.float64).reshape(len(items), depth, -1)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return np.einsum("kw,nkw->n", q, x) / depth


def test_notebook_01_trains_with_fit_and_writes_a_run_folder(workdir):
    from tfemde.quickstart import FAST_BUDGET

    _, text, images = run_notebook(workdir, "01_train_with_fit.ipynb")
    run = workdir / "runs" / "emoji_dive_temde"
    for name in ("config.json", "tokenizer.model", "best.keras", "history.csv", "metrics.json"):
        assert (run / name).is_file(), name
    for name in ("pairs.png", "curves.png", "text_to_image.png", "image_to_text.png"):
        assert (run / name).stat().st_size > 10_000, name
    assert images == 4  # shown inline too

    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "dive_temde" and config["embed_dim"] == FAST_BUDGET["embed_dim"]
    with open(run / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert len(history) == FAST_BUDGET["epochs"]
    for row in history:  # the validation callback's RSUM is the sum of its six recalls
        assert float(row["val_rsum"]) == pytest.approx(sum(float(row[f"val_{k}"]) for k in RECALLS), abs=1e-3)
    assert json.loads((run / "best.json").read_text())["epoch"] == 1

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["rsum"] == pytest.approx(sum(metrics[k] for k in RECALLS), abs=1e-6)
    printed = table_rows(text)["dive_temde"]
    np.testing.assert_allclose(printed, [metrics[k] for k in RECALLS + ("rsum",)], atol=0.051)
    assert "ms/step" in text and "val_rsum" in text  # the Keras progress bar with the callback's logs


def test_notebook_02_exports_and_serves_without_tensorflow(workdir):
    from tfemde.serving import Encoder

    _, text, images = run_notebook(workdir, "02_export_and_serve.ipynb")
    export = workdir / "runs" / "emoji_dive_temde_export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["preset"] == "dive_temde"
    assert images == 1 and (workdir / "runs" / "search_results.png").stat().st_size > 10_000
    assert "served the model without importing TensorFlow or Keras" in text

    # The printed hits for each text query are the top of an independent NumPy scoring of the saved index.
    encoder = Encoder.load(export)
    alpha, weight = manifest["similarity"]["alpha"], manifest["similarity"]["sketch_weight"]
    with np.load(workdir / "runs" / "emoji_images.index.npz", allow_pickle=False) as saved:
        ids, sets, sketches = saved["ids"], saved["sets"], saved["sketches"]
    assert len(ids) == 3789
    lines = re.findall(r"^\s*'(.+?)' -> (.+)$", text, re.MULTILINE)
    assert [q for q, _ in lines] == ["red heart", "cat face", "rocket", "pizza", "flag: Japan"]
    for query, hits in lines:
        tokens = hits.split()
        hit_ids, hit_scores = tokens[0::2], np.array(tokens[1::2], dtype=float)
        q = encoder.encode_texts([query])
        scores = smooth_chamfer(q.sets[0], sets, alpha) + weight * sketch_cosine(q.sketches[0], sketches,
                                                                                 q.sketch_depth)
        position = {str(name): i for i, name in enumerate(ids)}
        at = [position[h] for h in hit_ids]
        np.testing.assert_allclose(scores[at], hit_scores, atol=0.006)
        assert scores[at[0]] >= np.max(scores) - 1e-4, query
        assert np.all(np.diff(scores[at]) <= 1e-4), query

    timing = re.search(r"encode the text: ([\d.]+) ms, search (\d+) images: ([\d.]+) ms", text)
    assert timing and int(timing.group(2)) == 3789 and float(timing.group(1)) > 0 and float(timing.group(3)) > 0
    assert manifest["quantized"]["text"]["file"] == "text.int8.onnx"
    int8 = re.search(r"int8 text encoder: ([\d.]+) ms per query \(float32 ([\d.]+) ms\); smallest cosine to "
                     r"float32 ([\d.]+); same top hit for (\d+)% of the queries", text)
    assert int8 and float(int8.group(3)) >= 0.99 and 0 <= int(int8.group(4)) <= 100
    difference = re.search(r"max \|e2e - sentencepiece route\| = (\S+)", text)
    assert difference and float(difference.group(1)) < 1e-4


def test_notebook_03_reads_own_data_compares_presets_and_builds_a_backbone(workdir):
    _, text, _ = run_notebook(workdir, "03_your_own_data.ipynb")
    assert "Dataset 'dataset_emoji' (image_files): 72 items" in text
    assert "Dataset 'emoji_precomp' (regions): 72 items, 360 captions" in text
    assert "regions (2, 12, 64)" in text
    assert re.search(r"^pixels 64 \| test RSUM", text, re.MULTILINE)
    assert re.search(r"^regions 12 64 \| test RSUM", text, re.MULTILINE)

    rows = table_rows(text)
    assert sorted(rows) == ["dive_temde", "vse"]
    for name, values in rows.items():
        assert values[6] == pytest.approx(sum(values[:6]), abs=0.35), name  # rounding of seven printed values
        metrics = json.loads((workdir / "runs" / "presets" / name / "metrics.json").read_text())
        np.testing.assert_allclose(values, [metrics[k] for k in RECALLS + ("rsum",)], atol=0.051)

    assert "MobileNetV2: 2,257,984 parameters, a 3×3×1280 feature map" in text
    assert "{'set': (4, 1, 64)}" in text
    assert "backbone weights read from mobilenet_v2_no_top.weights.h5: True" in text
    temporary = re.search(r"^image_files (\S+)$", text, re.MULTILINE).group(1)
    assert "tfemde-own-data-" in temporary and not Path(temporary).exists()  # the notebook cleans up
