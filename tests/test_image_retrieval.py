"""Image-to-image retrieval across styles: `evaluate(task="i2i")` and `tfemde evaluate --task i2i`, on the emoji
set's Noto and Twemoji styles, against a re-derivation from the image encoder's own outputs."""

import json

import numpy as np
import pytest

from helpers import tiny_run
from tfemde.data import load
from tfemde.evaluation import evaluate, image_retrieval_metrics
from tfemde.serving import Embeddings, similarity
from tfemde.serving.centroids import group_centroids


@pytest.fixture(scope="module")
def styles_test_split():
    return load("emoji", styles=("noto", "twemoji"), split="test")


def _encode(model, images):
    outputs = model.image_encoder.predict({"image": images.astype("float32") / 255.0}, verbose=0, batch_size=256)
    config = model.config
    return Embeddings(np.asarray(outputs["set"]), sketches=np.asarray(outputs["sketch"]) if config.sketch else None,
                      sketch_depth=config.sketch_depth if config.sketch else None)


@pytest.mark.parametrize("gallery", ["items", "centroids"])
def test_i2i_scores_twemoji_queries_against_the_noto_gallery(styles_test_split, tmp_path, gallery):
    model, tokenizer = tiny_run(tmp_path, "dive_temde")
    ds = styles_test_split
    got = evaluate(model, ds, tokenizer=tokenizer, task="i2i", query_style="twemoji", gallery_style="noto",
                   gallery=gallery, progress=False)
    queries, targets = ds.item_styles == "twemoji", ds.item_styles == "noto"
    query, target = _encode(model, ds.images[queries]), _encode(model, ds.images[targets])
    target_group = ds.item_group[targets]
    if gallery == "centroids":
        target, target_group = group_centroids(target, target_group, "slot_mean")
        assert got["gallery_size"] == len(np.unique(ds.item_group[targets]))
    else:
        assert got["gallery_size"] == int(targets.sum())
    config = model.config
    scores = similarity(query, target, alpha=config.alpha, sketch_weight=config.sketch_weight)
    expected = image_retrieval_metrics(scores, ds.item_group[queries], target_group)
    for key in ("map", "r1", "r5", "r10", "queries"):
        assert got[key] == pytest.approx(expected[key], abs=1e-3), key
    assert got["queries"] == int(queries.sum())


def test_i2i_errors(styles_test_split, tmp_path):
    model, tokenizer = tiny_run(tmp_path, "vse")
    with pytest.raises(ValueError, match="query_style must be one of the data set's styles"):
        evaluate(model, styles_test_split, tokenizer=tokenizer, task="i2i", query_style="fluent",
                 gallery_style="noto")
    with pytest.raises(ValueError, match="must be different styles"):
        evaluate(model, styles_test_split, tokenizer=tokenizer, task="i2i", query_style="noto", gallery_style="noto")
    with pytest.raises(ValueError, match="has no item_styles"):
        evaluate(model, load("emoji", split="test"), tokenizer=tokenizer, task="i2i", query_style="twemoji",
                 gallery_style="noto")
    with pytest.raises(ValueError, match="task must be one of image_text, i2i"):
        evaluate(model, styles_test_split, tokenizer=tokenizer, task="t2t")


def test_cli_evaluates_i2i_and_writes_json(tmp_path, capsys):
    from tfemde.cli import main
    from tfemde.training.runs import train

    run = tmp_path / "run"
    # a run folder needs train and val splits: a small two-style slice of the real data
    ds = load("emoji", styles=("noto", "twemoji"))
    keep = np.concatenate([np.flatnonzero((ds.item_split == s) & np.isin(ds.item_group, np.unique(
        ds.item_group[ds.item_split == s])[:25])) for s in ("train", "val", "test")])
    train(data=ds.subset(keep), preset="vse", epochs=1, batch_size=16, out=run, vocab_size=60, verbose=0,
          embed_dim=16, word_dim=8, cnn_filters=(4, 8))
    code = main(["evaluate", str(run), "--task", "i2i", "--query-style", "twemoji", "--gallery-style", "noto",
                 "--gallery", "centroids"])
    assert code == 0
    written = json.loads((run / "metrics_test_i2i_twemoji_to_noto_centroids.json").read_text())
    assert set(written) == {"map", "r1", "r5", "r10", "queries", "skipped", "gallery_size"}
    assert 0 <= written["map"] <= 100 and written["queries"] > 100
    assert "twemoji->noto_centroids" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--task", "i2i", "--query-style", "twemoji"]) == 2
    assert "--task i2i needs --query-style and --gallery-style" in capsys.readouterr().err
