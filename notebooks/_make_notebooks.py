"""Writes the three tutorial notebooks from the cells below, without outputs.

The notebooks are reviewed and diffed as this file; `python notebooks/execute.py` then runs them and saves their
outputs (`--fast` for a smoke run with TFEMDE_FAST=1). Run this after editing a cell:

    python notebooks/_make_notebooks.py            # rewrites notebooks/0*.ipynb (outputs are dropped)
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text):
    return new_code_cell(textwrap.dedent(text).strip())


# ------------------------------------------------------------------------------------------------------------------
NB01 = [
    md("""
    # 1 · Train a dual encoder with `model.fit`

    This notebook trains tfemde's default model, `dive_temde` (DivE's slot-attention set prediction plus a T-EMDE
    sketch, scored with Smooth-Chamfer), on the built-in emoji data: images of emoji and their names. Every step is
    plain Keras: a `tf.data` pipeline, `model.fit` with callbacks, a `.keras` checkpoint.

    The run folder it writes (`runs/emoji_dive_temde`) is the one `tfemde train` writes, so notebook 2 can export
    it. With `TFEMDE_FAST=1` in the environment, everything shrinks to a smoke run of a minute.
    """),
    code("""
    import json
    import os
    import shutil
    import textwrap
    import time
    import warnings
    from pathlib import Path

    import numpy as np
    from IPython.display import Image

    import tfemde  # first: it quiets TensorFlow's logging before TensorFlow loads
    import keras
    from tfemde.quickstart import BUDGET, FAST_BUDGET

    # A few CLDR names hold CJK characters that matplotlib's default font cannot draw; they show as boxes.
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")
    FAST = os.environ.get("TFEMDE_FAST") == "1"
    budget = dict(FAST_BUDGET if FAST else BUDGET)
    MAX_LENGTH = 24  # caption tokens
    RUN = Path("runs/emoji_dive_temde")
    shutil.rmtree(RUN, ignore_errors=True)  # start clean: BestCheckpoint would keep a better model from before
    RUN.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    print("smoke run" if FAST else "full run", budget)
    """),
    md("""
    ## The data

    `tfemde.data.load("emoji")` returns a `Dataset`: 64×64 images, their captions, a split per image and a group
    per image (skin-tone variants of one emoji form a group and count as matches in evaluation).
    """),
    code("""
    from tfemde.data import load

    dataset = load("emoji")
    if FAST:  # the first images of each split
        per_split = {"train": 240, "val": 60, "test": 60}
        keep = [np.flatnonzero(dataset.item_split == split)[:n] for split, n in per_split.items()]
        dataset = dataset.subset(np.sort(np.concatenate(keep)), name="emoji-small")
    dataset.summary()
    train, val, test = (dataset.split(name) for name in ("train", "val", "test"))
    """),
    md("A few training pairs: each image with its captions."),
    code("""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    fig, axes = plt.subplots(2, 4, figsize=(11, 5.5))
    for axis, item in zip(axes.flat, rng.choice(train.num_items, size=8, replace=False)):
        axis.imshow(train.images[item])
        axis.set_title("\\n".join(textwrap.wrap(" | ".join(train.item_captions(item)), 32)[:4]), fontsize=8)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(RUN / "pairs.png", dpi=80)
    plt.close(fig)
    Image(filename=str(RUN / "pairs.png"))
    """),
    md("""
    ## The tokenizer

    A SentencePiece model trained on the training captions. It is saved in the run folder: the export and the
    serving runtime use the very same file.
    """),
    code("""
    from tfemde.text import Tokenizer

    tokenizer = Tokenizer.train(train.captions, vocab_size=budget["vocab_size"])
    tokenizer.save(RUN / "tokenizer.model")
    ids, mask = tokenizer.encode(["smiling cat face with heart-eyes"], max_length=MAX_LENGTH)
    print(tokenizer)
    print([tokenizer.id_to_piece(int(i)) for i in ids[0][mask[0]]])
    """),
    md("""
    ## The model

    `preset("dive_temde", ...)` is a `DualEncoderConfig`; any field can be overridden. `build_dual_encoder` makes a
    functional `keras.Model` whose image and text encoders are standalone models sharing its weights, and
    `compile()` picks the papers' optimizer (AdamW with a cosine schedule and gradient clipping). The loss comes
    from the config too: `loss` (InfoNCE by default, which learns from scratch; `loss="triplet"` is the papers'
    hardest-negative triplet) over the model's similarity, Smooth-Chamfer + λ·sketch.
    """),
    code("""
    from tfemde.models import build_dual_encoder, preset

    overrides = {key: value for key, value in budget.items() if key not in ("epochs", "batch_size", "vocab_size")}
    config = preset("dive_temde", vocab_size=tokenizer.vocab_size, max_length=MAX_LENGTH,
                    image_size=train.images.shape[1], **overrides)
    config.save(RUN / "config.json")
    model = build_dual_encoder(config)
    model.compile()
    print(f"{config.preset}: K={config.set_size} embeddings of D={config.embed_dim} per image and per caption, "
          f"sketch of {config.sketch_size}, loss {config.loss}")
    print(f"parameters: image encoder {model.image_encoder.count_params():,}, "
          f"text encoder {model.text_encoder.count_params():,}")
    """),
    md("""
    ## Input pipelines

    `train_dataset` yields shuffled (image, caption) pairs with the ids the loss needs to tell positives from
    negatives, in batches of captions of about the same length (`bucket_width`); its augmentations (the papers'
    caption token masking, image crop and flip) are off here, as in `tfemde.training.runs.train`: in a short run from scratch
    they slow fitting more than they help. `eval_dataset` holds the validation images and captions in order, for the
    full similarity matrix.
    """),
    code("""
    from tfemde.data import NO_AUGMENTATION, eval_dataset, train_dataset

    batch_size = min(budget["batch_size"], train.num_captions)
    train_data = train_dataset(train, tokenizer, batch_size=batch_size, max_length=MAX_LENGTH, seed=0, bucket_width=8,
                               **NO_AUGMENTATION)
    val_data = eval_dataset(val, tokenizer, batch_size=256, max_length=MAX_LENGTH)
    batch = next(iter(train_data))
    print({name: tuple(value.shape) for name, value in batch.items()})
    """),
    md("""
    ## Training with `fit`

    Three callbacks: `RetrievalValidation` adds the validation recalls and RSUM (the sum of the six R@K, at most
    600) to the logs after each epoch, `BestCheckpoint` saves `best.keras` whenever `val_rsum` improves, and
    `CSVLogger` writes `history.csv`.
    """),
    code("""
    from tfemde.training.callbacks import BestCheckpoint, RetrievalValidation

    callbacks = [
        RetrievalValidation(val_data, verbose=0),
        BestCheckpoint(RUN / "best.keras"),
        keras.callbacks.CSVLogger(str(RUN / "history.csv")),
    ]
    started = time.time()
    history = model.fit(train_data, epochs=budget["epochs"], callbacks=callbacks, verbose=1,
                        shuffle=False)  # train_dataset reshuffles every epoch itself
    print(f"{budget['epochs']} epochs in {time.time() - started:.0f} s")
    """),
    code("""
    from tfemde.training.plots import plot_history

    plot_history(RUN / "history.csv", RUN / "curves.png", title=f"{config.preset} on {dataset.name}")
    Image(filename=str(RUN / "curves.png"))
    """),
    md("""
    ## Test retrieval

    The best checkpoint, reopened from the run folder, on the test split: image→text (i2t) and text→image (t2i)
    recall at 1, 5 and 10 in percent. A retrieved image of the query's group counts as correct.
    """),
    code("""
    from tfemde.evaluation import evaluate, format_metrics
    from tfemde.models.run_folder import open_run

    run = open_run(RUN)  # config.json + tokenizer.model + best.keras
    metrics = evaluate(run.model, test, tokenizer=run.tokenizer, progress=False)
    record = {**{key: float(value) for key, value in metrics.items()}, "split": "test", "preset": config.preset,
              "epochs": budget["epochs"], "batch_size": batch_size}
    (RUN / "metrics.json").write_text(json.dumps(record, indent=2) + "\\n")
    print(format_metrics({config.preset: metrics}))
    print(f"median rank of the right answer: image→text {metrics['i2t_medr']:.0f}, "
          f"text→image {metrics['t2i_medr']:.0f} (of {test.num_items} images)")
    """),
    md("""
    ## What it retrieves

    Test captions as queries with their top five test images (green frame: correct), then test images with their
    top captions (green: a caption of that image). Embeddings are computed once; the similarity is the model's own,
    in NumPy (`tfemde.serving.similarity`).
    """),
    code("""
    from tfemde.evaluation import encode_dataset
    from tfemde.training.plots import plot_image_to_text, plot_text_to_image
    from tfemde.serving import similarity

    image_embeddings, caption_embeddings = encode_dataset(run.model, test, run.tokenizer)
    score = dict(alpha=config.alpha, sketch_weight=config.sketch_weight if config.sketch else 0.0)

    queries = rng.choice(test.num_captions, size=5, replace=False)
    scores = similarity(caption_embeddings.take(queries), image_embeddings, **score)  # [5, test images]
    top = np.argsort(-scores, axis=1)[:, :5]
    correct = test.item_group[top] == test.item_group[test.caption_item[queries]][:, None]
    plot_text_to_image([test.captions[c] for c in queries], test.images, top, RUN / "text_to_image.png",
                       scores=np.take_along_axis(scores, top, axis=1), relevant=correct,
                       title="text → image on the test split")
    Image(filename=str(RUN / "text_to_image.png"))
    """),
    code("""
    items = rng.choice(test.num_items, size=4, replace=False)
    scores = similarity(image_embeddings.take(items), caption_embeddings, **score)  # [4, test captions]
    top = np.argsort(-scores, axis=1)[:, :4]
    correct = test.caption_item[top] == items[:, None]
    plot_image_to_text(test.images[items], [[test.captions[c] for c in row] for row in top],
                       RUN / "image_to_text.png", relevant=correct, title="image → text on the test split")
    Image(filename=str(RUN / "image_to_text.png"))
    """),
    md("""
    The run folder now holds what `tfemde train` would have written, plus the pictures. Notebook 2 exports it to
    ONNX and serves it without TensorFlow.
    """),
    code("""
    for path in sorted(RUN.iterdir()):
        print(f"{path.name:<18} {path.stat().st_size / 1024:9.1f} KiB")
    """),
]

# ------------------------------------------------------------------------------------------------------------------
NB02 = [
    md("""
    # 2 · Export to ONNX and serve without TensorFlow

    Exporting is a training-side step (it needs TensorFlow): `tfemde.export.export_run(run_dir, out_dir)` or the
    `tfemde export` command. It runs here as a separate process, so that this notebook's kernel is what a serving
    application is: it imports `tfemde.serving` (NumPy, onnxruntime, SentencePiece) and never TensorFlow or Keras —
    the last cell checks that.

    It exports the run notebook 1 wrote; run alone, it first trains one with `tfemde train`.
    """),
    code("""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np
    from IPython.display import Image

    FAST = os.environ.get("TFEMDE_FAST") == "1"
    RUN = Path("runs/emoji_dive_temde")
    EXPORT = Path("runs/emoji_dive_temde_export")


    def tfemde_command(*args, show_last=3):
        \"\"\"Run the `tfemde` command line in its own process and print the end of what it printed.\"\"\"
        result = subprocess.run([sys.executable, "-m", "tfemde.cli", *map(str, args)], capture_output=True, text=True)
        lines = result.stdout.replace("\\r", "\\n").splitlines()
        print("\\n".join(lines[-show_last:]))
        if result.returncode:
            raise RuntimeError(f"tfemde {args[0]} failed:\\n{result.stderr[-3000:]}")
    """),
    code("""
    if not (RUN / "best.keras").is_file():
        from tfemde.quickstart import BUDGET, FAST_BUDGET

        budget = dict(FAST_BUDGET if FAST else BUDGET)
        overrides = [f"{k}={v}" for k, v in budget.items() if k not in ("epochs", "batch_size", "vocab_size")]
        print(f"no run in {RUN}: training one first")
        tfemde_command("train", "--data", "emoji", "--preset", "dive_temde", "--out", RUN,
                       "--epochs", budget["epochs"], "--batch-size", budget["batch_size"],
                       "--vocab-size", budget["vocab_size"], "--set", *overrides, show_last=4)
    """),
    md("""
    ## Export

    The export folder holds `image.onnx`, `text.onnx`, `text_e2e.onnx` (tokenizer inside the graph), a SavedModel,
    the tokenizer and `manifest.json`. Before it reports success, every graph is checked against TensorFlow.
    `--quantize` adds `image.int8.onnx` and `text.int8.onnx`: int8 weights, faster on a CPU, checked by cosine.
    """),
    code("""
    started = time.time()
    tfemde_command("export", RUN, "--out", EXPORT, "--quantize", show_last=4)
    print(f"({time.time() - started:.0f} s)")
    for path in sorted(EXPORT.iterdir()):
        size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
        print(f"  {path.name + ('/' if path.is_dir() else ''):<16} {size / 1024:9.1f} KiB")
    """),
    md("""
    ## Load it, as an application would

    `Encoder.load` reads the manifest and checks every file it uses against its sha256; the encoder knows the
    model's similarity (α, λ), so an index scores exactly as training did.
    """),
    code("""
    from tfemde.serving import Encoder, SetIndex

    encoder = Encoder.load(EXPORT)
    print(encoder)
    print("similarity:", encoder.similarity_kwargs)
    """),
    md("""
    ## Embed images and captions

    The application's images: all emoji (`tfemde.data.load` reads them with NumPy alone). `encode_images` takes
    `uint8` arrays or a list of image files; `encode_texts` takes strings.
    """),
    code("""
    from tfemde.data import load

    emoji = load("emoji")
    started = time.time()
    image_embeddings = encoder.encode_images(emoji.images)
    print(f"{len(emoji.images)} images in {time.time() - started:.1f} s: {image_embeddings}")
    started = time.time()
    caption_embeddings = encoder.encode_texts(emoji.captions)
    print(f"{len(emoji.captions)} captions in {time.time() - started:.1f} s: {caption_embeddings}")
    """),
    md("""
    ## Build, save and reload an index

    `SetIndex` is exact top-k search with the model's own similarity, saved as one checked `.npz` file.
    """),
    code("""
    index = SetIndex(**encoder.similarity_kwargs)
    index.add(image_embeddings, ids=emoji.item_names)  # ids: the emoji themselves
    index_file = index.save(Path("runs/emoji_images.index.npz"))
    index = SetIndex.load(index_file)
    print(f"{index} -> {index_file} ({os.path.getsize(index_file) / 2**20:.1f} MiB)")
    """),
    md("## Search with text"),
    code("""
    queries = ["red heart", "cat face", "rocket", "pizza", "flag: Japan"]
    ids, scores = index.search(encoder.encode_texts(queries), k=5)
    ids_by_text = ids
    for query, row, row_scores in zip(queries, ids, scores):
        print(f"{query!r:>14} -> " + "  ".join(f"{hit} {s:.2f}" for hit, s in zip(row, row_scores)))
    """),
    code("""
    from tfemde.training.plots import plot_text_to_image

    position = {name: i for i, name in enumerate(emoji.item_names)}
    top = np.vectorize(position.get)(ids)
    plot_text_to_image(queries, emoji.images, top, Path("runs/search_results.png"), scores=scores,
                       title="text queries over every emoji image, served with onnxruntime")
    Image(filename="runs/search_results.png")
    """),
    md("""
    ## Search with an image

    An image file as the query, against an index of all captions (their ids are caption numbers; captions repeat).
    """),
    code("""
    from PIL import Image as PILImage

    query_file = Path("runs/query.png")
    PILImage.fromarray(emoji.images[position["🚀"]]).save(query_file)
    caption_index = SetIndex(**encoder.similarity_kwargs)
    caption_index.add(caption_embeddings)
    ids, scores = caption_index.search(encoder.encode_images([str(query_file)]), k=5)
    print(f"{query_file} (🚀):")
    for c, s in zip(ids[0], scores[0]):
        print(f"  {s:6.2f}  {emoji.captions[c]}")
    """),
    md("""
    ## How long a query takes

    One text query end to end: tokenize, run `text.onnx`, score against every indexed image, take the top 10.
    """),
    code("""
    def best_of(fn, repeats=30):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1000 * np.median(times)


    query = encoder.encode_texts(["a red heart"])
    encode_ms = best_of(lambda: encoder.encode_texts(["a red heart"]))
    search_ms = best_of(lambda: index.search(query, k=10))
    print(f"encode the text: {encode_ms:.2f} ms, search {len(index)} images: {search_ms:.2f} ms "
          f"(median of 30, {os.cpu_count()} cores)")
    """),
    md("""
    ## int8: faster, nearly the same

    The quantized graphs of the same export: compare their embeddings with the float32 ones and time the query again.
    """),
    code("""
    fast = Encoder.load(EXPORT, precision="int8")
    exact_sets, fast_sets = encoder.encode_texts(queries).sets, fast.encode_texts(queries).sets
    cosine = (exact_sets * fast_sets).sum(-1).min()  # unit vectors
    fast_ms = best_of(lambda: fast.encode_texts(["a red heart"]))
    fast_ids, _ = index.search(fast.encode_texts(queries), k=5)
    same_top = np.mean([a == b for a, b in zip(ids_by_text[:, 0], fast_ids[:, 0])])
    print(f"int8 text encoder: {fast_ms:.2f} ms per query (float32 {encode_ms:.2f} ms); smallest cosine to "
          f"float32 {cosine:.4f}; same top hit for {same_top:.0%} of the queries")
    """),
    md("""
    ## One graph for any language

    `text_e2e.onnx` takes the raw strings and tokenizes inside the graph (the onnxruntime-extensions SentencePiece
    op), which is what an application in another language would load. Its op library cannot be registered in a
    process that has imported TensorFlow — no problem here. It gives the same embeddings:
    """),
    code("""
    e2e = Encoder.load(EXPORT, text_route="e2e")
    difference = np.abs(e2e.encode_texts(queries).sets - encoder.encode_texts(queries).sets).max()
    print(f"max |e2e - sentencepiece route| = {difference:.1e}")
    """),
    code("""
    loaded = sorted(name for name in ("tensorflow", "keras", "tf2onnx") if name in sys.modules)
    assert not loaded, f"the serving side imported {loaded}"
    print("this kernel served the model without importing TensorFlow or Keras")
    """),
]

# ------------------------------------------------------------------------------------------------------------------
NB03 = [
    md("""
    # 3 · Your own data, the presets side by side, a `keras.applications` backbone

    `tfemde.data.load` reads a Karpathy split JSON with its image folder (COCO, Flickr30K), a SCAN/VSE precomp
    folder of region features, or a JSONL file. This notebook makes a tiny folder of each of the first two, trains
    on them, then compares presets on the emoji data and builds a model on a `keras.applications` backbone.
    With `TFEMDE_FAST=1` everything is a smoke run.
    """),
    code("""
    import json
    import logging
    import os
    import shutil
    import tempfile
    import time
    import warnings
    from pathlib import Path

    import numpy as np
    from PIL import Image as PILImage

    import tfemde  # first: it quiets TensorFlow's logging before TensorFlow loads
    from tfemde.data import load
    from tfemde.evaluation import format_metrics
    from tfemde.training.runs import train

    # Training several small models in a row: Keras notes that tf.data input is not reshuffled by fit (the
    # pipeline shuffles itself) and TensorFlow counts the retracing of each new model's functions. Both are harmless.
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    FAST = os.environ.get("TFEMDE_FAST") == "1"
    work = tempfile.TemporaryDirectory(prefix="tfemde-own-data-")
    WORK = Path(work.name)
    emoji = load("emoji")  # the source of the images and captions written below
    rng = np.random.default_rng(0)
    picked = {split: rng.choice(np.flatnonzero(emoji.item_split == split), size=n, replace=False)
              for split, n in (("train", 48), ("val", 12), ("test", 12))}
    TINY = dict(epochs=1, batch_size=16, vocab_size=120, embed_dim=32, word_dim=16, verbose=0)  # for tiny folders
    """),
    md("""
    ## A Karpathy split JSON and its images

    `dataset_*.json` lists each image's `filepath`/`filename`, its `split` (`restval` counts as train) and its
    `sentences[].raw`. The images stay files, decoded and resized in `tf.data`.
    """),
    code("""
    karpathy = WORK / "karpathy"
    images = []
    for split, items in picked.items():
        for i in items:
            filename = f"{i:04d}.png"
            (karpathy / "images").mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(emoji.images[i]).save(karpathy / "images" / filename)
            images.append({"filepath": "images", "filename": filename, "split": split, "imgid": int(i),
                           "sentences": [{"raw": caption} for caption in emoji.item_captions(i)]})
    (karpathy / "dataset_emoji.json").write_text(json.dumps({"dataset": "emoji", "images": images}))
    print(json.dumps(images[0], ensure_ascii=False))

    own = load(karpathy / "dataset_emoji.json")
    own.summary()
    print(own.kind, own.image_paths[0])
    """),
    md("""
    `tfemde.training.runs.train` takes the loaded `Dataset` or the JSON's path (`tfemde train --data path/dataset_x.json`);
    the images are resized to the config's `image_size` (64 by default).
    """),
    code("""
    run = train(data=own, preset="vse", out=WORK / "runs" / "karpathy", **TINY)
    print(run.config.image_input, run.config.image_size, "| test RSUM", round(run.metrics["rsum"], 1))
    """),
    md("""
    ## A precomp folder of region features

    Per split, `{split}_ims.npy` `[images, regions, features]` (36 × 2048 bottom-up-attention regions in the public
    releases; random 12 × 64 here) and `{split}_caps.txt` with five captions per image on consecutive lines.
    Features are opened as memory maps, never read whole.
    """),
    code("""
    precomp = WORK / "emoji_precomp"
    precomp.mkdir()
    for split, file_split in (("train", "train"), ("val", "dev"), ("test", "test")):
        items = picked[split]
        features = rng.normal(size=(len(items), 12, 64)).astype(np.float32)
        np.save(precomp / f"{file_split}_ims.npy", features)
        captions = [(emoji.item_captions(i) * 5)[:5] for i in items]  # exactly five per image
        (precomp / f"{file_split}_caps.txt").write_text("\\n".join(c for five in captions for c in five) + "\\n")
    print(sorted(p.name for p in precomp.iterdir()))

    regions = load(precomp)
    regions.summary()
    print(regions.kind, regions.region_features([0, 1]).shape)
    """),
    code("""
    run = train(data=regions, preset="vse", out=WORK / "runs" / "precomp", **TINY)
    print(run.config.image_input, run.config.num_regions, run.config.region_dim,
          "| test RSUM", round(run.metrics["rsum"], 1), "(random features: chance level)")
    """),
    md("""
    ## The presets side by side

    The six presets differ only in the head and the similarity; they train with the same `fit` and optimizer, so
    comparing them is an ablation.
    """),
    code("""
    from tfemde.models import PRESETS, preset

    for name in PRESETS:
        c = preset(name)
        head = f"set of K={c.num_slots} (SetPrediction)" if c.head == "set" else f"one vector ({c.pooling} pooling)"
        print(f"{name:<11} {head:<30} sketch={c.sketch}")
    """),
    md("""
    Training some of them with the same budget on the emoji data (a short budget: notebook 1 and
    `tfemde quickstart` train longer, and `benchmarks/quality.py` repeats this over seeds).
    """),
    code("""
    from tfemde.quickstart import BUDGET, FAST_BUDGET

    if FAST:
        names, budget = ["vse", "dive_temde"], dict(FAST_BUDGET)
        per_split = {"train": 240, "val": 60, "test": 60}
        keep = [np.flatnonzero(emoji.item_split == split)[:n] for split, n in per_split.items()]
        data = emoji.subset(np.sort(np.concatenate(keep)), name="emoji-small")
    else:
        names, budget, data = ["vse", "temde", "dive_temde"], {**BUDGET, "epochs": 2}, emoji
    print(f"{data.name}: {budget}")

    results = {}
    for name in names:
        out = Path("runs/presets") / name
        shutil.rmtree(out, ignore_errors=True)
        started = time.time()
        results[name] = train(data=data, preset=name, out=out, verbose=0, **budget).metrics
        print(f"{name:<11} trained and evaluated in {time.time() - started:4.0f} s")
    print()
    print(format_metrics(results))
    """),
    md("""
    ## A `keras.applications` backbone

    `image_input="backbone"` puts any `keras.applications` model (by name) in the image tower; its last feature map
    becomes the set of local features. `backbone_weights` is passed to the application: `None` for random weights,
    or the path of a weights file you have (nothing is downloaded unless you ask for `"imagenet"`).
    """),
    code("""
    from tfemde.models import build_dual_encoder

    config = preset("vse", image_input="backbone", backbone="MobileNetV2", backbone_weights=None, image_size=96,
                    vocab_size=200, embed_dim=64, word_dim=32)
    model = build_dual_encoder(config)
    backbone = model.get_layer("image_backbone")
    _, height, width, channels = backbone.output.shape
    print(f"MobileNetV2: {backbone.count_params():,} parameters, a {height}×{width}×{channels} feature map "
          f"= a set of {height * width} local features")
    images = np.stack([np.asarray(PILImage.fromarray(image).resize((96, 96))) for image in emoji.images[:4]])
    out = model.image_encoder.predict({"image": images / 255.0}, verbose=0)
    print({name: value.shape for name, value in out.items()})
    """),
    md("""
    With pretrained weights: download the "no top" file of the application once on a machine with internet
    (for MobileNetV2 at 96 px, `mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5` from the
    keras-applications releases; any `.h5` or `.weights.h5` the application's `load_weights` reads) and pass its
    path. Here a file saved from the backbone above stands in for it:
    """),
    code("""
    weights_file = WORK / "mobilenet_v2_no_top.weights.h5"
    backbone.save_weights(weights_file)
    pretrained = build_dual_encoder(config.replace(backbone_weights=str(weights_file)))
    same = all(np.array_equal(a, b) for a, b in zip(backbone.get_weights(),
                                                     pretrained.get_layer("image_backbone").get_weights()))
    print(f"backbone weights read from {weights_file.name}: {same}")
    """),
    md("""
    Training it is the same call as before, e.g.
    `train(data="dataset_coco.json", preset="dive_temde", image_input="backbone", backbone="MobileNetV2",
    backbone_weights="mobilenet_v2_..._no_top.h5", image_size=96, out="runs/coco_mobilenet")`.
    """),
    code("""
    work.cleanup()
    """),
]

NOTEBOOKS = {
    "01_train_with_fit.ipynb": NB01,
    "02_export_and_serve.ipynb": NB02,
    "03_your_own_data.ipynb": NB03,
}


def make(name, cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    prefix = name.split("_")[0]
    for i, cell in enumerate(nb.cells):
        cell.id = f"nb{prefix}-{i:02d}"  # stable ids keep diffs small
    nbformat.validate(nb)
    return nb


def main(argv=None) -> int:
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        nbformat.write(make(name, cells), str(path))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
