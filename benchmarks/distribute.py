"""What training on several replicas costs and buys: the cross-replica gather and the global loss, and the
global batch's effect on quality at a fixed number of examples.

Two replicas are two logical CPU devices of this machine under `MirroredStrategy` (what a 2-GPU machine runs, on
cores instead: two replicas on 2 cores cannot be faster than one device, so this measures overhead, not speed-up).

1. Cost per step at the DivE COCO size (36 x 2048 regions, BiGRU 1024, K = 4, D = 1024, four shared blocks,
   hardest-negative triplet + MMD + diversity), B image-caption pairs a step, median of `--steps` fit steps:
   - one device, global batch B;
   - two replicas that gather (each scores B x B: tfemde's loss);
   - two replicas without the gather (each scores its own B/2 x B/2: what a plain per-replica loss does);
   and, alone, the all-gather of the embeddings and ids, and the loss (forward + backward) at B x B against
   B/2 x B/2.
2. Quality (`--quality`): dive_temde at the quickstart budget on the emoji data (6 epochs, global batch 64, so every
   arm sees the same examples), validation RSUM of the best epoch for one device, two replicas that gather and
   two replicas with only local negatives. One seed; quality is chosen on validation and nothing here is tuned.

    python benchmarks/distribute.py                 # cost, B = 128
    python benchmarks/distribute.py --quality       # and the quality arms (about 10 minutes on 2 cores)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from _machine import describe  # noqa: E402
from tfemde.layers import replicas  # noqa: E402
from tfemde.models import build_dual_encoder, dual_encoder  # noqa: E402

RESULTS = Path(__file__).with_name("results") / "distribute.json"
DIVE_COCO = dict(image_input="regions", num_regions=36, region_dim=2048, embed_dim=1024, word_dim=300,
                 vocab_size=10000, max_length=12, num_slots=4, set_depth=4, set_heads=4, ff_mult=4,
                 share_weights=True, loss="triplet", warmup_epochs=0, mmd_weight=0.01, diversity_weight=0.1)


class local_negatives:
    """Within it, the DualEncoder's loss sees only its own replica's batch (the gather is switched off)."""

    def __enter__(self):
        self.saved = dual_encoder.gather_global_batch
        dual_encoder.gather_global_batch = lambda values: dict(values)

    def __exit__(self, *exc):
        dual_encoder.gather_global_batch = self.saved


def coco_batch(pairs, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=(pairs, 36)) >= 0.2
    mask[:, 0] = True
    return {"regions": np.maximum(rng.normal(size=(pairs, 36, 2048)), 0).astype("float32"), "region_mask": mask,
            "caption_ids": rng.integers(1, 10000, size=(pairs, 12)).astype("int32"),
            "caption_mask": np.ones((pairs, 12), bool), "image_id": np.arange(pairs)}


def step_seconds(strategy, batch, steps, warmup=2):
    """Median seconds between the ends of fit steps (after `warmup` untimed steps)."""
    scope = strategy.scope() if strategy is not None else tf.device("/cpu:0")
    with scope:
        keras.utils.set_random_seed(0)
        model = build_dual_encoder("dive", **DIVE_COCO)
        model.compile()

    class Clock(keras.callbacks.Callback):
        ends = []

        def on_train_batch_end(self, index, logs=None):
            self.ends.append(time.perf_counter())

    clock = Clock()
    clock.ends = []
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(warmup + steps), epochs=1, verbose=0, callbacks=[clock])
    return statistics.median(np.diff(clock.ends[warmup - 1:]))


def gather_and_loss_seconds(strategy, pairs, runs=10):
    """The all-gather alone (two replicas) and the global loss's forward + backward at B x B and B/2 x B/2."""
    rng = np.random.default_rng(0)
    half = pairs // 2

    def outputs(n):
        unit = rng.normal(size=(n, 4, 1024)).astype("float32")
        unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
        return {"image_set": unit, "text_set": unit[::-1].copy(), "image_residual": unit, "text_residual": unit,
                "image_id": np.arange(n)}

    local = outputs(pairs)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: {k: v[context.replica_id_in_sync_group * half:(context.replica_id_in_sync_group + 1) * half]
                         for k, v in local.items()})
    gather = tf.function(lambda values: strategy.run(replicas.gather_global_batch, args=(values,)))

    def timed(fn, *args):
        fn(*args)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t,
                                  strategy.experimental_local_results(fn(*args)) if fn is gather else fn(*args))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    model = build_dual_encoder("dive", **DIVE_COCO)

    def loss_and_gradients(values):
        sets = {k: tf.identity(v) for k, v in values.items() if k != "image_id"}
        with tf.GradientTape() as tape:
            tape.watch(sets)
            loss = model._batch_loss(sets, {"image_id": values["image_id"]})
        return loss, tape.gradient(loss, sets)

    loss_fn = tf.function(loss_and_gradients, reduce_retracing=True)
    small = {k: v[:half] for k, v in local.items()}
    return {"gather": timed(gather, per_replica), "loss_global": timed(loss_fn, local),
            "loss_local": timed(loss_fn, small)}


def quality(epochs=6, batch_size=64):
    from tfemde.quickstart import BUDGET
    from tfemde.training.runs import train

    budget = {**BUDGET, "epochs": epochs, "batch_size": batch_size}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    arms = {}
    for name, arm_strategy, local in (("one device", None, False), ("two replicas, gather", strategy, False),
                                      ("two replicas, local negatives", strategy, True)):
        with tempfile.TemporaryDirectory() as folder:
            started = time.time()
            context = local_negatives() if local else _nothing()
            with context:
                run = train(data="emoji", preset="dive_temde", out=Path(folder) / "run", verbose=0,
                            strategy=arm_strategy, **budget)
            best = json.loads((Path(folder) / "run" / "best.json").read_text())
            arms[name] = {"val_rsum": best["best"], "best_epoch": best["epoch"], "test_rsum": run.metrics["rsum"],
                          "minutes": round((time.time() - started) / 60, 1)}
            print(f"  {name:32s} val RSUM {best['best']:6.1f} (epoch {best['epoch']})  "
                  f"{arms[name]['minutes']:.1f} min", flush=True)
    return arms


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="global image-caption pairs a step (default 128)")
    parser.add_argument("--steps", type=int, default=4, help="timed fit steps per arm")
    parser.add_argument("--quality", action="store_true", help="also train the three quality arms")
    parser.add_argument("--quality-only", action="store_true", help="only the quality arms (keeps the cost record)")
    args = parser.parse_args(argv)
    print(f"# {describe()}")
    print(f"# tensorflow {tf.__version__} | keras {keras.__version__} | two logical CPU devices for two replicas")
    if args.quality_only:
        record = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        print("\n## quality at a fixed number of examples: dive_temde, emoji, quickstart budget, global batch 64")
        record.update(quality=quality(), quality_machine=describe())
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {RESULTS}")
        return 0
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    batch = coco_batch(args.batch)
    print(f"\n## cost per step, DivE COCO size, global batch {args.batch} pairs")
    cost = {"one device": step_seconds(None, batch, args.steps),
            "two replicas, gather": step_seconds(strategy, batch, args.steps)}
    with local_negatives():
        cost["two replicas, local negatives"] = step_seconds(strategy, batch, args.steps)
    base = cost["one device"]
    for name, seconds in cost.items():
        print(f"  {name:32s} {seconds:7.3f} s/step  {seconds / base:5.2f}x one device", flush=True)
    parts = gather_and_loss_seconds(strategy, args.batch)
    print(f"  gather of embeddings + ids alone {parts['gather'] * 1e3:7.2f} ms "
          f"({parts['gather'] / cost['two replicas, gather']:.2%} of a two-replica step)")
    print(f"  loss fwd+bwd at {args.batch}x{args.batch}: {parts['loss_global'] * 1e3:.1f} ms; at "
          f"{args.batch // 2}x{args.batch // 2}: {parts['loss_local'] * 1e3:.1f} ms "
          f"(the larger matrix adds {(parts['loss_global'] - parts['loss_local']) / cost['two replicas, gather']:.2%}"
          " of a two-replica step)")
    record = {"machine": describe(), "batch": args.batch, "steps": args.steps, "seconds_per_step": cost,
              "parts_seconds": parts}
    if args.quality:
        print("\n## quality at a fixed number of examples: dive_temde, emoji, quickstart budget, global batch 64")
        record["quality"] = quality()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
