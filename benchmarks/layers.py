"""Speed of the global aggregators against the set length L: T-EMDE sketch vs self-attention vs SetPrediction.

For every L, each aggregator runs forward + backward (gradients for its weights and for the token features) in a
`tf.function` on `[batch, L, dim]` float32 tokens with a padding mask (valid lengths drawn in [L/2, L]). After
warm-up calls (which include tracing), the median of the timed runs is reported, with ratios to the sketch and
each aggregator's growth exponent in L (the slope of log time against log L).

    python benchmarks/layers.py                  # L = 16 64 256 1024 4096, batch 32, dim 1024
    python benchmarks/layers.py --quick          # fewer runs, tighter time budget per cell
    python benchmarks/layers.py --lengths 64,256 --batch 8

Cells that cannot fit in memory (an estimate: self-attention keeps several [batch, heads, L, L] float32 tensors)
or whose predicted time per step exceeds --max-step-seconds (extrapolated from the previous L) are skipped, with
the reason printed. Targets (ALGORITHMS.md §5): sketch exponent <= 1.1; sketch >= 8x faster than self-attention
at L = 1024.
"""

import argparse
import datetime
import math
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np

from _machine import cpu_model, describe  # noqa: E402
import tensorflow as tf  # noqa: E402


from tfemde.layers.sketch import TEMDESketch  # noqa: E402

GIB = 1024**3


def import_set_prediction(retries, wait_seconds):
    """SetPrediction may still be in the making by another helper: retry a few times, then give up (None)."""
    for attempt in range(retries + 1):
        try:
            from tfemde.layers.set_prediction import SetPrediction

            return SetPrediction, None
        except Exception as error:  # ImportError or a half-written module
            reason = f"{type(error).__name__}: {error}"
            if attempt < retries:
                print(f"# SetPrediction not importable ({reason}); retrying in {wait_seconds:.0f} s", flush=True)
                time.sleep(wait_seconds)
    return None, reason


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16,64,256,1024,4096", help="comma-separated set lengths L")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=16, help="T-EMDE partitionings N")
    parser.add_argument("--bits", type=int, default=6, help="T-EMDE hyperplanes per partitioning (W = 2**bits)")
    parser.add_argument("--heads", type=int, default=8, help="self-attention heads")
    parser.add_argument("--key-dim", type=int, default=128, help="self-attention key dim per head")
    parser.add_argument("--slots", type=int, default=4, help="SetPrediction slots K (DivE: 4)")
    parser.add_argument("--spm-depth", type=int, default=4, help="SetPrediction blocks T (DivE: 4, shared)")
    parser.add_argument("--spm-heads", type=int, default=4, help="SetPrediction heads (DivE: 4 x 512)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2, quick 1)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls (default 5, quick 3)")
    parser.add_argument("--max-step-seconds", type=float, default=None,
                        help="skip a cell whose predicted step time exceeds this (default 240, quick 60)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory budget for a cell (default: 60%% of MemAvailable, at most 24)")
    parser.add_argument("--quick", action="store_true", help="fewer runs and a tighter time budget")
    parser.add_argument("--methods", default="sketch,attention,set_prediction")
    parser.add_argument("--import-retries", type=int, default=5)
    parser.add_argument("--import-wait", type=float, default=30.0)
    args = parser.parse_args()
    args.lengths = [int(v) for v in args.lengths.split(",") if v]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.runs is None:
        args.runs = 3 if args.quick else 5
    if args.max_step_seconds is None:
        args.max_step_seconds = 60.0 if args.quick else 240.0
    if args.memory_gib is None:
        args.memory_gib = min(24.0, 0.6 * available_memory_gib())
    return args


def available_memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 24.0




# ---------------------------------------------------------------- aggregators: (tokens, mask) -> global output


class SelfAttentionBlock(keras.layers.Layer):
    """The baseline aggregator T-EMDE replaces: masked multi-head self-attention, then masked mean pooling."""

    def __init__(self, heads, key_dim, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=key_dim)

    def call(self, tokens, mask):
        valid = tf.cast(mask, tokens.dtype)
        attended = self.attention(tokens, tokens, attention_mask=tf.cast(mask[:, None, :], "bool"))
        total = tf.reduce_sum(attended * valid[..., None], axis=1)
        return total / tf.maximum(tf.reduce_sum(valid, axis=1, keepdims=True), 1.0)


def build_aggregators(args, set_prediction_cls):
    aggregators = {}
    if "sketch" in args.methods:
        sketch = TEMDESketch(depth=args.depth, bits=args.bits, temperature=1.0)
        aggregators["sketch"] = (sketch, lambda tokens, mask, globals_: sketch(tokens, mask=mask))
    if "attention" in args.methods:
        attention = SelfAttentionBlock(args.heads, args.key_dim)
        aggregators["attention"] = (attention, lambda tokens, mask, globals_: attention(tokens, mask))
    if "set_prediction" in args.methods and set_prediction_cls is not None:
        spm = set_prediction_cls(num_slots=args.slots, dim=args.dim, depth=args.spm_depth, num_heads=args.spm_heads)
        aggregators["set_prediction"] = (
            spm,
            lambda tokens, mask, globals_: spm(tokens, globals_, mask=mask, training=True),
        )
    return aggregators


def memory_estimate_gib(method, args, length):
    """A rough peak-memory estimate of one forward+backward step (float32), to skip cells that cannot fit."""
    b, d = args.batch, args.dim
    tokens = b * length * d * 4
    if method == "sketch":
        per_token = args.depth * (2**args.bits) + args.depth * args.bits
        return (6 * tokens + 5 * b * length * per_token * 4) / GIB
    if method == "attention":
        inner = args.heads * args.key_dim
        scores = b * args.heads * length * length * 4
        return (6 * tokens + 8 * b * length * inner * 4 + 4 * scores) / GIB
    inner = args.spm_heads * max(1, 2 * d // args.spm_heads)
    return (6 * tokens + args.spm_depth * 4 * b * length * (inner + d) * 4) / GIB


def make_step(layer, forward):
    @tf.function
    def step(tokens, mask, globals_):
        with tf.GradientTape() as tape:
            tape.watch([tokens, globals_])
            out = tf.cast(forward(tokens, mask, globals_), "float32")
            loss = tf.reduce_sum(tf.square(out))
        grads = tape.gradient(loss, [tokens, globals_] + layer.trainable_weights)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads if g is not None]) * 0.0

    return step


def time_cell(step, args, length, rng):
    tokens = tf.constant(rng.normal(size=(args.batch, length, args.dim)).astype("float32"))
    lengths = rng.integers(max(1, length // 2), length + 1, size=args.batch)
    mask = tf.constant(np.arange(length)[None, :] < lengths[:, None])
    globals_ = tf.constant(rng.normal(size=(args.batch, args.dim)).astype("float32"))
    for _ in range(args.warmup):
        step(tokens, mask, globals_).numpy()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        step(tokens, mask, globals_).numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def slope(points):
    """Least-squares slope of log(time) against log(L)."""
    if len(points) < 2:
        return float("nan")
    x = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def fmt_time(value):
    return f"{value * 1000:10.1f}" if isinstance(value, float) else f"{value:>10}"


def main():
    args = parse_args()
    set_prediction_cls, spm_reason = (None, "not requested")
    if "set_prediction" in args.methods:
        set_prediction_cls, spm_reason = import_set_prediction(args.import_retries, args.import_wait)

    print("# tfemde layer benchmark: forward + backward, tf.function, float32")
    print(f"# date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine   {describe()}")
    print(f"#           {platform.node()}  {cpu_model()}  cores={os.cpu_count()}  "
          f"mem_available={available_memory_gib():.1f} GiB  budget={args.memory_gib:.1f} GiB")
    print(f"# versions  python {platform.python_version()}  tensorflow {tf.__version__}  keras {keras.__version__}  "
          f"numpy {np.__version__}")
    print(f"# shapes    batch={args.batch} dim={args.dim} lengths={args.lengths}; warmup={args.warmup} "
          f"runs={args.runs} (median); max step {args.max_step_seconds:.0f} s")
    print(f"# sketch    TEMDESketch(depth={args.depth}, bits={args.bits}) -> [B, {args.depth}, {2**args.bits}], "
          "soft assignment, standardize, L2 rows")
    print(f"# attention MultiHeadAttention(num_heads={args.heads}, key_dim={args.key_dim}) on the tokens "
          "(padding mask) + masked mean pooling")
    if set_prediction_cls is not None:
        print(f"# set_pred  SetPrediction(num_slots={args.slots}, dim={args.dim}, depth={args.spm_depth}, "
              f"num_heads={args.spm_heads}) (DivE defaults, shared weights, dropout on)")
    else:
        print(f"# set_pred  SKIPPED: {spm_reason}")
    print(flush=True)

    aggregators = build_aggregators(args, set_prediction_cls)
    results = {name: {} for name in aggregators}
    notes = []
    rng = np.random.default_rng(0)
    for name, (layer, forward) in aggregators.items():
        step = make_step(layer, forward)
        measured = []
        for length in args.lengths:
            need = memory_estimate_gib(name, args, length)
            if need > args.memory_gib:
                results[name][length] = "skip-mem"
                notes.append(f"{name} L={length}: skipped, estimated {need:.1f} GiB > budget {args.memory_gib:.1f} GiB")
                continue
            if measured:
                last_l, last_t = measured[-1]
                exponent = max(1.0, slope(measured[-2:]) if len(measured) > 1 else 1.0)
                predicted = last_t * (length / last_l) ** exponent
                if predicted > args.max_step_seconds:
                    results[name][length] = "skip-time"
                    notes.append(f"{name} L={length}: skipped, predicted {predicted:.0f} s per step > "
                                 f"{args.max_step_seconds:.0f} s")
                    continue
            try:
                seconds = time_cell(step, args, length, rng)
            except (tf.errors.ResourceExhaustedError, MemoryError) as error:
                results[name][length] = "OOM"
                notes.append(f"{name} L={length}: out of memory ({type(error).__name__})")
                continue
            results[name][length] = seconds
            measured.append((length, seconds))
            print(f"# {name:14s} L={length:5d}  {seconds * 1000:10.1f} ms", flush=True)

    names = list(aggregators)
    print()
    print("Median time per forward+backward step (ms); ratio = time / sketch time")
    header = f"{'L':>6} " + " ".join(f"{n:>14}" for n in names)
    header += "".join(f" {n + '/sketch':>22}" for n in names if n != "sketch")
    print(header)
    for length in args.lengths:
        row = f"{length:>6} " + " ".join(f"{fmt_time(results[n][length]):>14}" for n in names)
        for n in names:
            if n == "sketch":
                continue
            a, s = results[n].get(length), results.get("sketch", {}).get(length)
            ratio = f"{a / s:.1f}x" if isinstance(a, float) and isinstance(s, float) else "-"
            row += f" {ratio:>22}"
        print(row)

    print()
    print("Growth exponent in L (log-log slope): all measured L / the two largest measured L")
    exponents = {}
    for n in names:
        pts = [(length, t) for length, t in results[n].items() if isinstance(t, float)]
        exponents[n] = (slope(pts), slope(pts[-2:]))
        print(f"  {n:14s} {exponents[n][0]:6.2f} / {exponents[n][1]:6.2f}   (over L = {[p[0] for p in pts]})")

    if notes:
        print()
        for note in notes:
            print(f"  note: {note}")

    print()
    print("Targets")
    if "sketch" in exponents:
        fit, tail = exponents["sketch"]
        worst = max(fit, tail)
        verdict = "n/a" if math.isnan(worst) else ("PASS" if worst <= 1.1 else "FAIL")
        print(f"  sketch exponent <= 1.1: {verdict} (fit {fit:.2f}, tail {tail:.2f})")
    s, a = results.get("sketch", {}).get(1024), results.get("attention", {}).get(1024)
    if isinstance(s, float) and isinstance(a, float):
        print(f"  sketch >= 8x faster than self-attention at L=1024: {'PASS' if a / s >= 8 else 'FAIL'} "
              f"({a / s:.1f}x)")
    else:
        print("  sketch >= 8x faster than self-attention at L=1024: n/a (cell not measured)")


if __name__ == "__main__":
    main()
