"""`tfemde quickstart --fast`: the main job end to end on a subset of the built-in data."""

import json

from tfemde.quickstart import MODELS, quickstart


def test_quickstart_trains_both_models_draws_examples_and_queries_the_export(tmp_path):
    lines = []
    results = quickstart(out=tmp_path, fast=True, print_fn=lines.append)
    assert sorted(results) == sorted(MODELS)
    for name in MODELS:
        assert 0 <= results[name]["rsum"] <= 600
        for file in ("best.keras", "curves.png", "metrics.json", "history.csv"):
            assert (tmp_path / name / file).is_file(), f"{name}/{file}"
    assert (tmp_path / "retrieval_examples.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["preset"] == MODELS[0]
    top_level_files = {p.name for p in (tmp_path / "export").iterdir() if p.is_file() and p.name != "manifest.json"}
    assert top_level_files == {"image.onnx", "text.onnx", "text_e2e.onnx", "tokenizer.model"}
    assert top_level_files <= set(manifest["files"])  # every file carries its checksum
    output = "\n".join(lines)
    assert "rsum" in output and "'rocket' (train concept) ->" in output
    assert "train concepts (1530): hit@1" in output and "test concepts (198)" in output
    assert "test concepts searched over the 748 images outside the training split only: hit@5" in output
    for name in MODELS:
        assert set(results[name]["concepts"]) == {"train", "val", "test"}
