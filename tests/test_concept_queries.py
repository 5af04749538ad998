"""Concept queries: every concept's name searched over the whole gallery, hit@K per split of the concept and apart
for names with a word no training caption holds; against a re-derivation from the encoders' own outputs."""

import numpy as np
import pytest

from helpers import tiny_run
from tfemde.data import Dataset, load
from tfemde.evaluation import caption_words, concept_queries, names_with_unseen_words
from tfemde.serving import Embeddings, similarity


def test_caption_words_are_lower_cased_runs_of_letters_and_digits():
    assert caption_words("Flag: Japan") == ["flag", "japan"]
    assert caption_words("1st place medal, gold") == ["1st", "place", "medal", "gold"]
    assert caption_words("four o’clock_x") == ["four", "o", "clock", "x"]
    assert caption_words("") == []


def test_names_with_unseen_words_look_only_at_training_captions():
    data = Dataset(name="t", captions=["red heart", "Cat face", "rocket", "blue whale"], caption_item=[0, 1, 2, 3],
                   item_split=["train", "train", "val", "test"], item_group=[0, 1, 2, 3],
                   images=np.zeros((4, 2, 2, 3), np.uint8))
    names = ["red heart", "RED, cat!", "rocket", "heart face", "blue heart", ""]
    # "rocket" and "blue" are only in val/test captions: unseen for a model that trains on the train split
    assert names_with_unseen_words(names, data).tolist() == [False, False, True, False, True, False]


@pytest.fixture(scope="module")
def small_emoji():
    full = load("emoji")
    keep = np.concatenate([np.flatnonzero(full.item_split == s)[:n] for s, n in (("train", 80), ("val", 40),
                                                                                   ("test", 40))])
    return full.subset(np.sort(keep), name="emoji-small")


def test_concept_queries_against_a_rederivation(small_emoji, tmp_path):
    model, tokenizer = tiny_run(tmp_path, "dive_temde")
    data = small_emoji
    got = concept_queries(model, data, tokenizer=tokenizer, max_length=12)

    # independent: each group's first captioned item, its first caption, scored by the encoders' own outputs
    first_caption = {}
    for caption, item in enumerate(data.caption_item):
        first_caption.setdefault(int(item), caption)
    groups, names, splits = [], [], []
    for item in range(data.num_items):
        group = int(data.item_group[item])
        if group not in groups and item in first_caption:
            groups.append(group)
            names.append(data.captions[first_caption[item]])
            splits.append(data.item_split[item])
    config = model.config
    images = model.image_encoder.predict({"image": data.images.astype("float32") / 255.0}, verbose=0)
    ids, mask = tokenizer.encode(names, 12)
    texts = model.text_encoder.predict({"caption_ids": ids, "caption_mask": mask}, verbose=0)

    def embeddings(outputs):
        return Embeddings(np.asarray(outputs["set"]), sketches=np.asarray(outputs["sketch"]),
                          sketch_depth=config.sketch_depth)

    scores = similarity(embeddings(texts), embeddings(images), alpha=config.alpha, sketch_weight=config.sketch_weight)
    training_words = {w for c, i in zip(data.captions, data.caption_item) if data.item_split[i] == "train"
                      for w in caption_words(c)}
    for split in ("train", "val", "test"):
        rows = [q for q in range(len(names)) if splits[q] == split]
        unseen = {q for q in rows if not set(caption_words(names[q])) <= training_words}
        parts = {None: rows, "seen_words": [q for q in rows if q not in unseen],
                 "unseen_words": [q for q in rows if q in unseen]}
        for part, chosen in parts.items():
            figures = got[split] if part is None else got[split].get(part)
            if not chosen:
                assert figures is None, (split, part)
                continue
            for k in (1, 5, 10):
                hits = 0
                for q in chosen:
                    own = data.item_group == groups[q]
                    best = scores[q][own].max()
                    hits += int((scores[q][~own] >= best).sum() < k)
                assert figures[f"hit@{k}"] == pytest.approx(100.0 * hits / len(chosen)), (split, part, k)
            assert figures["queries"] == len(chosen)
        # the same queries over the items the model never trained on, for the splits of unseen concepts
        if split == "train":
            assert "new_images" not in got[split]
            continue
        new = data.item_split != "train"
        for k in (1, 5, 10):
            hits = 0
            for q in rows:
                own = data.item_group == groups[q]
                best = scores[q][own].max()
                hits += int((scores[q][~own & new] >= best).sum() < k)
            assert got[split]["new_images"][f"hit@{k}"] == pytest.approx(100.0 * hits / len(rows)), (split, k)
        assert got[split]["new_images"]["queries"] == len(rows)
        assert got[split]["new_images"]["hit@5"] >= got[split]["hit@5"]  # fewer items ahead of each match
    # names of train concepts use training words only; the small test split has both kinds
    assert "unseen_words" not in got["train"]
    assert got["test"]["seen_words"]["queries"] > 0 and got["test"]["unseen_words"]["queries"] > 0


def test_encoding_with_many_models_stays_quiet(small_emoji, tmp_path):
    """Each new encoder traces its inference function; TensorFlow counts the traces of every function made at one
    line of code together, and warned about "frequent retracing" in the quickstart (a run's validation, its best
    checkpoint, the next run), where every trace was a new model's."""
    import logging

    from tfemde.evaluation import encode_dataset

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    tf_logger = logging.getLogger("tensorflow")  # TensorFlow's own; it does not propagate to the root logger
    tf_logger.addHandler(keep)
    try:
        for preset in ("vse", "dive", "dive_temde", "temde"):
            model, tokenizer = tiny_run(tmp_path / preset, preset)  # a new model, encoded in a few calls
            items, texts = encode_dataset(model, small_emoji, tokenizer, max_length=12, batch_size=128)
            assert len(items) == small_emoji.num_items and len(texts) == small_emoji.num_captions
    finally:
        tf_logger.removeHandler(keep)
    assert not [m for m in keep.messages if "retracing" in m]
