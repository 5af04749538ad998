"""Training speed of one `fit` step in the DivE COCO configuration, in images per second.

The configuration of `kdwonn/DivE: train_eval_coco.sh` (ALGORITHMS.md §3): 36 x 2048 BUTD regions per image (about
20 % masked out, as the region drop; the cost does not depend on it), 5 captions of 12 tokens per image, vocabulary
10,000, GloVe-size word embeddings (300), BiGRU 1024, K = 4 slots, D = 1024, 4 shared set-prediction blocks of
4 heads x 512, hardest-negative triplet + MMD + diversity loss (`warmup_epochs=0`: the steady state of training),
ScaledAdamW with cosine decay and global-norm clipping. A batch is B images and their 5B captions
(`caption_image_id`). Random data: speed does not depend on the values.

For every preset and batch size, `model.fit` runs on `tf.data.Dataset.from_tensors(batch).repeat(n)`; the first
`--warmup` steps (tracing, oneDNN primitive creation) are dropped and the median time between the ends of the
following steps gives images/s. The process CPU time of each step is printed too: on a machine shared with other
jobs the wall time mostly measures the others, while `2 x batch / CPU seconds` estimates the speed on 2 idle cores.
A per-component breakdown follows: each part runs forward + backward in its own `tf.function` (gradients for its
weights and for its inputs where the real step needs them), median of a few runs, beside the whole step; "rest" is
the step minus the parts (Keras' train step glue, gradient sums, metrics).

The work per step is printed as matmul GFLOP (forward multiply-adds x 2 x 3 for forward + backward, the context
projections of the shared blocks counted once, no gradient for the region features), with the machine's measured float32 matmul rate on the same threads:
their ratio is the speed a perfect implementation would reach.

    python benchmarks/train_speed.py                    # dive and dive_temde, batch 32 and 128, breakdown at 32
    python benchmarks/train_speed.py --quick            # batch 32 only, fewer steps
    python benchmarks/train_speed.py --presets dive --batches 32 --jit   # XLA-compiled train step

Reference: the official PyTorch code (kdwonn/DivE at f59bc1c, its own `train.train` iteration: AdamW, the same
loss terms, float32; torch 2.13.0 CPU, 2 threads), measured side by side with this benchmark on an Intel Xeon 2-core
box with AVX-512 and AMX on 2026-12-06: 15.5 / 15.1 images/s at batch 32 before / after, 15.2 at batch 128 (quoted
before that day as 8.5 images/s, from an earlier box). Target: twice the official code's speed.
"""

import argparse
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

from _machine import cpu_model, describe, load_average, memory_gib  # noqa: E402
import tensorflow as tf  # noqa: E402


REFERENCE_IMAGES_PER_SECOND = 15.2
TARGET_IMAGES_PER_SECOND = 2 * REFERENCE_IMAGES_PER_SECOND
CAPTIONS_PER_IMAGE = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="dive,dive_temde", help="comma-separated preset names")
    parser.add_argument("--batches", default=None, help="images per batch, comma-separated (default 32,128; quick 32)")
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads (and inter-op by default)")
    parser.add_argument("--inter-threads", type=int, default=None, help="TF inter-op threads (default: --threads)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first fit steps (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed fit steps (default 6; quick 3)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per breakdown component (default 5; quick 3)")
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA (jit_compile=True)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-component breakdown")
    parser.add_argument("--breakdown-batches", default="32", help="batch sizes to break down (comma-separated)")
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--min-caption-length", type=int, default=12,
                        help="caption lengths are drawn in [this, 12] (default 12: every caption has 12 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="batch 32 only, fewer steps and runs")
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = "32" if args.quick else "32,128"
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.breakdown_batches = [int(b) for b in args.breakdown_batches.split(",") if b]
    if args.inter_threads is None:
        args.inter_threads = args.threads
    if args.warmup is None:
        args.warmup = 2
    if args.steps is None:
        args.steps = 3 if args.quick else 6
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    return args


# ---------------------------------------------------------------- machine








def print_header(args):
    import keras

    print("# tfemde train speed, DivE COCO configuration")
    print(f"# date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine   {describe()}")
    print(f"#           {platform.node()} | {cpu_model()} | {os.cpu_count()} CPUs | {memory_gib():.1f} GiB | "
          f"{platform.platform()}")
    print(f"# versions  python {platform.python_version()} | tensorflow {tf.__version__} | keras {keras.__version__} | "
          f"numpy {np.__version__}")
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    print(f"# settings  threads intra={tf.config.threading.get_intra_op_parallelism_threads()} "
          f"inter={tf.config.threading.get_inter_op_parallelism_threads()} | oneDNN {onednn} | "
          f"jit_compile={args.jit} | warmup {args.warmup} steps, timed {args.steps} steps")
    print(f"# load avg  {load_average()} (other processes on the machine slow every figure below)")


def matmul_rate(runs=8):
    """The machine's float32 matmul rate (GFLOP/s) on the configured threads, at this workload's shapes (best run)."""
    rng = np.random.default_rng(0)
    rates = []
    for m, k, n in ((640, 1024, 4096), (1152, 2048, 1024)):
        a = tf.constant(rng.normal(size=(m, k)).astype("float32"))
        b = tf.constant(rng.normal(size=(k, n)).astype("float32"))
        f = tf.function(lambda a, b: tf.matmul(a, b))
        f(a, b).numpy()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            f(a, b).numpy()
            times.append(time.perf_counter() - start)
        rates.append(2.0 * m * k * n / min(times) / 1e9)
    return max(rates)


# ---------------------------------------------------------------- model, data and work


def build(preset_name, args):
    from tfemde.models import build_dual_encoder

    model = build_dual_encoder(
        preset_name, image_input="regions", num_regions=36, region_dim=2048, embed_dim=1024, word_dim=300,
        vocab_size=args.vocab_size, max_length=12, num_slots=4, set_depth=4, set_heads=4, ff_mult=4,
        share_weights=True, loss="triplet", warmup_epochs=0,
    )
    model.compile(jit_compile=args.jit)
    return model


def make_batch(images, vocab_size, seed, regions=36, region_dim=2048, length=12, min_length=12):
    rng = np.random.default_rng(seed)
    captions = CAPTIONS_PER_IMAGE * images
    region_mask = rng.uniform(size=(images, regions)) >= 0.2
    region_mask[:, 0] = True
    lengths = rng.integers(min_length, length + 1, size=captions)
    caption_mask = np.arange(length)[None, :] < lengths[:, None]
    caption_ids = np.where(caption_mask, rng.integers(1, vocab_size, size=(captions, length)), 0)
    return {
        "regions": np.maximum(rng.normal(size=(images, regions, region_dim)), 0.0).astype("float32"),
        "region_mask": region_mask,
        "image_id": np.arange(images, dtype="int32"),
        "caption_ids": caption_ids.astype("int32"),
        "caption_mask": caption_mask,
        "caption_image_id": np.repeat(np.arange(images, dtype="int32"), CAPTIONS_PER_IMAGE),
    }


def forward_macs(config, images, captions, regions=36, length=12):
    """Forward multiply-adds of the matmuls, per component (context projections of shared blocks once)."""
    d, w, k = config.embed_dim, config.word_dim, config.num_slots
    inner = config.set_heads * max(1, 2 * d // config.set_heads)
    hidden = config.ff_mult * d
    n_reg, n_tok = images * regions, captions * length
    per_slot_block = d * inner + inner * d + 2 * d * hidden  # q, output projection, FF
    blocks = config.set_depth
    context_sets = 1 if config.share_weights else blocks
    macs = {
        "image fc": n_reg * config.region_dim * d,
        "image MLP": n_reg * 2 * d * (d // 2),
        "text BiGRU": 2 * n_tok * 3 * d * (w + d),
        "image set prediction": context_sets * n_reg * d * 2 * inner + blocks * images * k * per_slot_block,
        "text set prediction": context_sets * n_tok * w * 2 * inner + blocks * captions * k * per_slot_block,
        "loss": (images * k) * (captions * k) * d + (images * k + captions * k) ** 2 * d,
    }
    if config.sketch:
        macs["sketch"] = (n_reg + n_tok) * d * config.sketch_depth * config.sketch_bits
    return macs


# ---------------------------------------------------------------- fit timing


def step_timer():
    """A Keras callback recording the wall and process CPU time at the end of every training batch."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = [time.perf_counter()]
            self.cpu = [time.process_time()]

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return StepTimer()


def time_fit(model, batch, args):
    """Wall seconds of the warm-up steps, then wall and process CPU seconds of each timed step."""
    steps = args.warmup + args.steps
    data = tf.data.Dataset.from_tensors(batch).repeat(steps)
    timer = step_timer()
    model.fit(data, epochs=1, verbose=0, callbacks=[timer])
    step_times, cpu_times = np.diff(timer.ends), np.diff(timer.cpu)
    return step_times[: args.warmup], step_times[args.warmup:], cpu_times[args.warmup:]


# ---------------------------------------------------------------- breakdown


def _median_time(fn, inputs, runs, warmup=2):
    """Median wall and process CPU seconds of `fn(*inputs)` after `warmup` calls."""
    for _ in range(warmup):
        tf.nest.map_structure(lambda t: t.numpy(), fn(*inputs))
    times, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        tf.nest.map_structure(lambda t: t.numpy(), fn(*inputs))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), statistics.median(cpu)


def _fwd_bwd(forward, weights, jit, input_gradients=True):
    """A tf.function: forward(*inputs), then the gradient of a scalar of its outputs wrt weights (and float inputs)."""

    @tf.function(jit_compile=jit)
    def step(*inputs):
        float_inputs = [x for x in inputs if x.dtype.is_floating] if input_gradients else []
        with tf.GradientTape() as tape:
            tape.watch(float_inputs)
            outputs = tf.nest.flatten(forward(*inputs))
            loss = tf.add_n([tf.reduce_sum(tf.cast(o, "float32") * tf.math.sin(tf.cast(o, "float32") + 1.0))
                             for o in outputs if o.dtype.is_floating])
        grads = tape.gradient(loss, list(weights) + float_inputs)
        # Embedding gradients are IndexedSlices: return their values (the optimizer is timed separately).
        return loss, [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads if g is not None]

    return step


def breakdown(model, batch, args, step_time, step_cpu):
    """Forward + backward time of each part of the step, in its own tf.function."""
    import keras

    config = model.config
    tensors = {name: tf.constant(value) for name, value in batch.items()}
    out = model(dict(tensors), training=True)  # shapes of the intermediate tensors
    rows = []

    # towers: sub-models cut from the functional graph
    struct = model._inputs_struct
    image_sub = keras.Model(
        [struct["regions"], struct["region_mask"]],
        [model.get_layer("image_dropout").output, model.get_layer("image_global_pool").output],
    )
    text_sub = keras.Model(
        [struct["caption_ids"], struct["caption_mask"]],
        [model.get_layer("text_gru").output[0], model.get_layer("text_global").output,
         model.get_layer("text_embedding_dropout").output],
    )
    image_local, image_global = image_sub([tensors["regions"], tensors["region_mask"]], training=True)
    text_sequence, text_global, text_embedded = text_sub([tensors["caption_ids"], tensors["caption_mask"]], training=True)

    # The region features are data: no gradient for them (the real step does not compute one either).
    image_fn = _fwd_bwd(lambda r, m: image_sub([r, m], training=True), image_sub.trainable_weights, args.jit,
                        input_gradients=False)
    rows.append(("image tower (fc + MLP + max pool)",
                 _median_time(image_fn, (tensors["regions"], tensors["region_mask"]), args.runs)))
    text_fn = _fwd_bwd(lambda i, m: text_sub([i, m], training=True), text_sub.trainable_weights, args.jit)
    rows.append(("text embedding + BiGRU", _median_time(text_fn, (tensors["caption_ids"], tensors["caption_mask"]),
                                                        args.runs)))
    for modality, local, global_, mask in (
        ("image", image_local, image_global, tensors["region_mask"]),
        ("text", text_embedded, text_global, tensors["caption_mask"]),
    ):
        layer = model.get_layer(f"{modality}_set_prediction")
        fn = _fwd_bwd(lambda x, g, m, layer=layer: layer(x, g, mask=m, training=True, return_residual=True),
                      layer.trainable_weights, args.jit)
        rows.append((f"{modality} set prediction (4 blocks)", _median_time(fn, (local, global_, mask), args.runs)))
    if config.sketch:
        sketch = model.get_layer("sketch")
        fn = _fwd_bwd(lambda a, am, b, bm: (sketch(a, mask=am), sketch(b, mask=bm)), sketch.trainable_weights,
                      args.jit)
        rows.append(("T-EMDE sketch (both towers)", _median_time(
            fn, (image_local, tensors["region_mask"], text_sequence, tensors["caption_mask"]), args.runs)))

    pred_names = sorted(out)
    pred_values = [tf.constant(out[name]) for name in pred_names]

    @tf.function(jit_compile=args.jit)
    def loss_fn(*values):
        with tf.GradientTape() as tape:
            tape.watch(list(values))
            loss = model.compute_loss(x=tensors, y_pred=dict(zip(pred_names, values)), training=True)
        return loss, tape.gradient(loss, list(values))

    rows.append(("similarity + loss (triplet, MMD, diversity)", _median_time(loss_fn, pred_values, args.runs)))

    from tfemde.models import ScaledAdamW

    optimizer = model.optimizer
    weights = model.trainable_variables
    rng = np.random.default_rng(1)
    grads = [tf.constant(rng.normal(0.0, 1e-3, size=w.shape).astype("float32")) for w in weights]

    @tf.function(jit_compile=args.jit)
    def apply(*grads):
        optimizer.apply(list(grads), weights)
        return tf.constant(0.0)

    fused = _median_time(apply, grads, args.runs)
    rows.append((f"optimizer (ScaledAdamW + clip, {sum(int(np.prod(w.shape)) for w in weights) / 1e6:.1f} M)", fused))
    generic = ScaledAdamW.from_config({**optimizer.get_config(), "fused": False})
    generic.build(weights)

    @tf.function(jit_compile=args.jit)
    def apply_generic(*grads):
        generic.apply(list(grads), weights)
        return tf.constant(0.0)

    unfused = _median_time(apply_generic, grads, args.runs)

    total, total_cpu = sum(t for _, (t, _) in rows), sum(c for _, (_, c) in rows)
    print(f"\n## breakdown: {config.preset}, batch {batch['regions'].shape[0]} images "
          f"(forward + backward of each part, median of {args.runs}; shares of the step's CPU time)")
    print(f"| {'part':<48} | {'wall s':>7} | {'CPU s':>7} | {'share':>6} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
    for name, (seconds, cpu) in rows:
        print(f"| {name:<48} | {seconds:7.3f} | {cpu:7.3f} | {100 * cpu / step_cpu:5.1f}% |")
    print(f"| {'sum of the parts':<48} | {total:7.3f} | {total_cpu:7.3f} | {100 * total_cpu / step_cpu:5.1f}% |")
    print(f"| {'whole fit step (median)':<48} | {step_time:7.3f} | {step_cpu:7.3f} | {100.0:5.1f}% |")
    print(f"| {'rest (train-step glue, overlap, noise)':<48} | {step_time - total:7.3f} | {step_cpu - total_cpu:7.3f} | "
          f"{100 * (step_cpu - total_cpu) / step_cpu:5.1f}% |")
    print(f"optimizer with Keras' generic update step (ScaledAdamW(fused=False)): {unfused[0]:.3f} s, "
          f"{unfused[0] / fused[0]:.2f}x the fused kernels'")


# ---------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    import keras

    keras.utils.set_random_seed(args.seed)
    print_header(args)
    rate = matmul_rate()
    print(f"# matmul    {rate:.0f} GFLOP/s float32 on {args.threads} threads (best of 8, this workload's shapes)",
          flush=True)

    results = []
    for preset_name in args.presets:
        for images in args.batches:
            keras.backend.clear_session()
            model = build(preset_name, args)
            batch = make_batch(images, args.vocab_size, args.seed, min_length=args.min_caption_length)
            macs = forward_macs(model.config, images, CAPTIONS_PER_IMAGE * images)
            # x 2 FLOP per multiply-add x 3 for forward + backward, less the regions' gradient nobody needs
            gflop = (6.0 * sum(macs.values()) - 2.0 * macs["image fc"]) / 1e9
            start = time.perf_counter()
            warm, timed, cpu = time_fit(model, batch, args)
            step = float(np.median(timed))
            row = dict(preset=preset_name, images=images, step=step, ips=images / step, cpu=float(np.median(cpu)),
                       best=images / float(np.min(timed)), warm=float(np.sum(warm)), gflop=gflop)
            results.append(row)
            print(f"# {preset_name:>10} batch {images:>3}: steps {' '.join(f'{t:.2f}' for t in timed)} s "
                  f"(warm-up {' '.join(f'{t:.1f}' for t in warm)} s), CPU {' '.join(f'{t:.2f}' for t in cpu)} s "
                  f"-> {row['ips']:.2f} images/s "
                  f"[{time.perf_counter() - start:.0f} s, load {load_average()}]", flush=True)
            if not args.no_breakdown and images in args.breakdown_batches:
                breakdown(model, batch, args, step, row["cpu"])
            del model

    end_rate = matmul_rate()
    print(f"\n# matmul    {end_rate:.0f} GFLOP/s float32 measured again after the runs; the bound below uses the best "
          f"of the two ({max(rate, end_rate):.0f})")
    for r in results:
        r["bound"] = r["images"] / (r["gflop"] / max(rate, end_rate))
    print("\n## images per second, one fit step (median of the timed steps)")
    versus = f"vs {REFERENCE_IMAGES_PER_SECOND}"
    print(f"| {'preset':<10} | {'batch':>5} | {'s/step':>7} | {'images/s':>8} | {'best':>6} | {versus:>7} | "
          f"{'CPU s/step':>10} | {'img/CPU-s x2':>12} | {'GFLOP/step':>10} | {'GFLOP/s':>7} | {'matmul bound':>12} |")
    print(f"|{'-' * 12}|{'-' * 7}|{'-' * 9}|{'-' * 10}|{'-' * 8}|{'-' * 9}|{'-' * 12}|{'-' * 14}|{'-' * 12}|{'-' * 9}|"
          f"{'-' * 14}|")
    for r in results:
        print(f"| {r['preset']:<10} | {r['images']:>5} | {r['step']:7.2f} | {r['ips']:8.2f} | {r['best']:6.2f} | "
              f"{r['ips'] / REFERENCE_IMAGES_PER_SECOND:6.2f}x | {r['cpu']:10.2f} | "
              f"{args.threads * r['images'] / r['cpu']:12.2f} | {r['gflop']:10.0f} | {r['gflop'] / r['step']:7.0f} | "
              f"{r['bound']:12.1f} |")
    print(f"# reference: official PyTorch {REFERENCE_IMAGES_PER_SECOND} images/s; target >= "
          f"{TARGET_IMAGES_PER_SECOND} images/s. images/s = batch / median wall time per step; best = fastest step.\n"
          f"# img/CPU-s x2 = batch / (process CPU seconds per step / {args.threads} threads): the speed with "
          f"{args.threads} otherwise idle cores, robust to other load.\n"
          "# matmul bound = batch / (GFLOP per step / the matmul rate measured above): a perfect implementation.")


if __name__ == "__main__":
    main()
