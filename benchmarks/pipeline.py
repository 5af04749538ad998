"""Throughput of the training input pipelines (`tfemde.data.train_dataset`), in batches per second.

Three sources at batch 128, default augmentations on:
  * emoji in memory: the built-in data set (`tfemde.data.load("emoji")`), or synthetic 64 px images of the same
    size if the reader is not available;
  * image files: the same images written as PNG files to a temporary folder, decoded in tf.data (cached after the
    first pass, and streamed with cache=False);
  * precomp regions: a temporary .npy memory map of 36 x 2048 float32 regions per item (just written, so mostly in
    the OS page cache: this measures the pipeline, not the disk).

Target: the pipeline must outrun training by a wide margin, >= 5x the training step rate of the default model.
Pass the measured step rate with --step-rate to print the target in batches/s.

`--epoch-gaps` measures instead what a `fit` loses between epochs: the vse preset at the quickstart size trains a few
epochs on the emoji pipeline with tf.data autotuning on and off (tfemde turns it off, `pipeline_options`), side by
side, and prints each epoch's wait from its start to its first step beyond a normal step.

Usage: .venv/bin/python benchmarks/pipeline.py [--batches 40] [--step-rate STEPS_PER_S]
       .venv/bin/python benchmarks/pipeline.py --epoch-gaps [--epochs 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from _machine import describe  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from tfemde.data import Dataset, train_dataset  # noqa: E402
from tfemde.text import Tokenizer  # noqa: E402

BATCH = 128


def emoji_or_synthetic():
    try:
        from tfemde.data import load

        return load("emoji").split("train"), "built-in emoji (train split)"
    except Exception as err:  # the reader is written by another helper; fall back to data of the same size
        rng = np.random.default_rng(0)
        n = 3000
        words = [f"w{i}" for i in range(3000)]
        captions, caption_item = [], []
        for item in range(n):
            for _ in range(2):
                captions.append(" ".join(rng.choice(words, size=rng.integers(2, 8))))
                caption_item.append(item)
        images = rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
        ds = Dataset("synthetic", captions=captions, caption_item=caption_item, item_split=["train"] * n,
                     item_group=np.arange(n), images=images)
        return ds, f"synthetic 64 px ({type(err).__name__}: emoji reader unavailable)"


def measure(ds, batches, windows=3):
    """(seconds to the first batch, median batches per second over `windows` runs of `batches` batches)."""
    start = time.perf_counter()
    it = iter(ds)
    next(it)
    first = time.perf_counter() - start
    for _ in range(3):  # let autotuning settle
        next(it)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        _ = batch["caption_ids"].numpy()
        rates.append(batches / (time.perf_counter() - start))
    return first, float(np.median(rates))


def epoch_gaps(epochs):
    """Per-epoch stalls of `fit` (seconds from epoch start to the end of its first step, minus the median step)."""
    import keras

    from tfemde.models import build_dual_encoder
    from tfemde.quickstart import BUDGET
    from tfemde.training.runs import DEFAULT_MAX_LENGTH, config_for

    train_split = emoji_or_synthetic()[0]
    tokenizer = Tokenizer.train(train_split.captions, vocab_size=BUDGET["vocab_size"])
    sizes = {k: BUDGET[k] for k in ("embed_dim", "word_dim")}

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.ends = time.perf_counter(), []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            step = float(np.median(np.diff(self.ends)))
            self.rows.append((self.ends[0] - self.start - step, step))

    results = {}
    for autotune in (True, False):
        keras.utils.set_random_seed(0)
        model = build_dual_encoder(config_for(train_split, tokenizer, "vse", DEFAULT_MAX_LENGTH, **sizes))
        model.compile()
        options = tf.data.Options()
        options.autotune.enabled = autotune
        data = train_dataset(train_split, tokenizer, BUDGET["batch_size"], DEFAULT_MAX_LENGTH).with_options(options)
        timer = Timer()
        timer.rows = []
        started = time.perf_counter()
        model.fit(data, epochs=epochs, verbose=0, callbacks=[timer])
        results[autotune] = (timer.rows, time.perf_counter() - started)
        print(f"  done: autotune {'on' if autotune else 'off'}", flush=True)
    print()
    print(f"fit stalls between epochs, vse at the quickstart size, batch {BUDGET['batch_size']}, {epochs} epochs")
    print(f"machine: {describe()}; TF {tf.__version__}")
    print("(epoch 1's stall includes tracing the train step)")
    print()
    print(f"| tf.data autotune | {' | '.join(f'epoch {e + 1} stall s' for e in range(epochs))} | median step ms | fit s")
    print(f"|------------------|{'|'.join('-' * 16 for _ in range(epochs))}|----------------|------")
    for autotune, (rows, seconds) in results.items():
        stalls = " | ".join(f"{gap:>14.1f}" for gap, _ in rows)
        step_ms = 1000 * float(np.median([step for _, step in rows]))
        print(f"| {'on' if autotune else 'off (tfemde)':<16} | {stalls} | {step_ms:>14.0f} | {seconds:.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epoch-gaps", action="store_true", help="measure fit's stalls between epochs instead")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run of --epoch-gaps")
    parser.add_argument("--batches", type=int, default=40, help="batches per timed window (median of 3)")
    parser.add_argument("--step-rate", type=float, default=None,
                        help="training steps/s of the default model at batch 128 (prints the 5x target)")
    parser.add_argument("--region-items", type=int, default=1000)
    args = parser.parse_args()
    if args.epoch_gaps:
        return epoch_gaps(args.epochs)

    emoji, emoji_note = emoji_or_synthetic()
    tokenizer = Tokenizer.train(emoji.captions, vocab_size=2000)
    rows = []

    def run(name, ds, note, **kwargs):
        pipeline = train_dataset(ds, tokenizer, BATCH, repeat=True, **kwargs)
        first, rate = measure(pipeline, args.batches)
        rows.append((name, rate, rate * BATCH, first, note))
        print(f"  done: {name}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        run("emoji in memory", emoji, emoji_note)

        images = emoji.images if emoji.images is not None else None
        if images is None:
            raise SystemExit("the emoji data set is not in memory; cannot write the image-file source")
        paths = []
        for i, pixels in enumerate(images):
            path = os.path.join(tmp, f"{i:05d}.png")
            Image.fromarray(pixels).save(path)
            paths.append(path)
        files = Dataset("files", captions=emoji.captions, caption_item=emoji.caption_item,
                        item_split=emoji.item_split, item_group=emoji.item_group, image_paths=paths)
        size = images.shape[1]
        run("image files, cached", files, f"{len(paths)} PNG {size} px, decoded once", image_size=size)
        run("image files, streamed", files, f"{len(paths)} PNG {size} px, cache=False", image_size=size, cache=False)

        n = args.region_items
        region_path = os.path.join(tmp, "train_ims.npy")
        writer = np.lib.format.open_memmap(region_path, mode="w+", dtype=np.float32, shape=(n, 36, 2048))
        rng = np.random.default_rng(0)
        for start in range(0, n, 100):
            writer[start:start + 100] = rng.random((min(100, n - start), 36, 2048), dtype=np.float32)
        writer.flush()
        del writer
        regions = np.load(region_path, mmap_mode="r")
        per_item = 5
        captions = [emoji.captions[i % emoji.num_captions] for i in range(n * per_item)]
        precomp = Dataset("precomp", captions=captions, caption_item=np.repeat(np.arange(n), per_item),
                          item_split=["train"] * n, item_group=np.arange(n), regions=regions)
        run("precomp regions", precomp, f"memmap {n} x 36 x 2048 f32 ({regions.nbytes / 2**20:.0f} MiB)")

    print()
    print(f"tfemde input pipeline throughput, batch {BATCH}, default augmentations, median of 3 windows of "
          f"{args.batches} batches")
    print(f"machine: {describe()}; TF {tf.__version__} (other processes share the cores)")
    print()
    print(f"| {'source':<22} | {'batches/s':>9} | {'pairs/s':>8} | {'1st batch s':>11} | notes")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 10}|{'-' * 13}|------")
    for name, rate, pairs, first, note in rows:
        print(f"| {name:<22} | {rate:>9.1f} | {pairs:>8.0f} | {first:>11.2f} | {note}")
    print()
    if args.step_rate:
        target = 5 * args.step_rate
        verdict = ", ".join(f"{name}: {'OK' if rate >= target else 'BELOW'}" for name, rate, *_ in rows)
        print(f"target: >= 5 x {args.step_rate:g} steps/s = {target:.1f} batches/s  ->  {verdict}")
    else:
        print("target: >= 5 x the training step rate of the default model (pass --step-rate to compare)")


if __name__ == "__main__":
    main()
