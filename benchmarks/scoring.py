"""How fast is the NumPy Smooth-Chamfer scoring next to the matrix multiply it cannot avoid?

Scores 5,000 image sets against 25,000 caption sets (COCO 5K: K = 4 elements of D = 1024 each, random unit
vectors), without and with a T-EMDE sketch of depth 16 x 64, and times next to each the bare float32 matrix
multiply of the same work in the same chunks (20,000 x 1024 @ 1024 x 100,000, plus 5,000 x 1024 @ 1024 x 25,000
for the sketch). Prints the times, their ratio, the peak memory, the machine and the date.

Targets: <= 30 s and <= 1.3 x the matmul time (the official PyTorch DivE evaluation takes 61 s for this).

    python benchmarks/scoring.py            # the full COCO 5K size (a few minutes)
    python benchmarks/scoring.py --quick    # 1,000 x 5,000 items
    python benchmarks/scoring.py --quick --single-thread   # CPU-time ratio on a busy machine
"""

import argparse
import datetime
import importlib
import os
import platform
import resource
import sys
import time
import tracemalloc

if "--single-thread" in sys.argv:  # before NumPy loads BLAS
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np

from _machine import cpu_model, describe


from tfemde.serving import Embeddings, similarity  # noqa: E402

similarity_module = importlib.import_module("tfemde.serving.similarity")


def unit_sets(rng, n, k, d, block=2048):
    out = np.empty((n, k, d), np.float32)
    for i in range(0, n, block):
        x = rng.standard_normal((min(block, n - i), k, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        out[i:i + len(x)] = x
    return out


def unit_sketches(rng, n, depth, width):
    s = rng.random((n, depth, width), dtype=np.float32)
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    return s


def matmul_reference(a_sets, b_sets, a_sketch=None, b_sketch=None):
    """The bare float32 matrix multiplies of `similarity`, in its chunks and loop order, into one reused buffer."""
    (n_a, k_a, d), (n_b, k_b, _) = a_sets.shape, b_sets.shape
    rows, cols = similarity_module.chunk_shape(None, k_a, k_b)
    a2, b2 = a_sets.reshape(-1, d), b_sets.reshape(-1, d)
    buf = np.empty((rows * k_a, cols * k_b), np.float32)
    start, cpu = time.perf_counter(), time.process_time()
    if a_sketch is not None:
        out = np.empty((n_a, n_b), np.float32)
        for i in range(0, n_a, 4096):
            np.matmul(a_sketch[i:i + 4096], b_sketch.T, out=out[i:i + 4096])
    for j in range(0, len(b2), cols * k_b):
        for i in range(0, len(a2), rows * k_a):
            x, y = a2[i:i + rows * k_a], b2[j:j + cols * k_b]
            np.matmul(x, y.T, out=buf[:len(x), :len(y)])
    return time.perf_counter() - start, time.process_time() - cpu


def timed_similarity(a, b, sketch_weight):
    tracemalloc.start()
    tracemalloc.reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    scores = similarity(a, b, alpha=16.0, sketch_weight=sketch_weight)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return scores, seconds, cpu, peak


def spot_check(scores, a, b, sketch_weight, rng, pairs=20):
    """Largest difference to a float64 per-pair computation of the formula on a few random pairs."""
    worst = 0.0
    for i, j in zip(rng.integers(0, len(a), pairs), rng.integers(0, len(b), pairs)):
        c = 16.0 * a.sets[i].astype(np.float64) @ b.sets[j].astype(np.float64).T
        want = (np.log(np.exp(c).sum(1)).mean() + np.log(np.exp(c).sum(0)).mean()) / 32.0
        if sketch_weight:
            want += sketch_weight * a.sketches[i].astype(np.float64) @ b.sketches[j] / a.sketch_depth
        worst = max(worst, abs(float(scores[i, j]) - want))
    return worst


def blas_summary():
    try:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{config.get('name')} {config.get('version')}"
    except Exception:  # older NumPy
        return "unknown"




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 images x 5,000 captions instead of 5K x 25K")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--captions", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per case; the fastest time of each column is reported")
    parser.add_argument("--threads", type=int, default=None, help="threads for the element-wise part (default: "
                        "one per core)")
    parser.add_argument("--single-thread", action="store_true", help="one BLAS thread and one element-wise thread:"
                        " CPU-time ratios that other work on the machine barely changes")
    args = parser.parse_args(argv)
    if args.threads:
        similarity_module._THREADS = args.threads
    if args.single_thread:
        similarity_module._THREADS = 1
    n_images = args.images or (1000 if args.quick else 5000)
    n_captions = args.captions or 5 * n_images
    k, d, depth, width = 4, 1024, 16, 64

    rng = np.random.default_rng(0)
    images = Embeddings(unit_sets(rng, n_images, k, d), sketches=unit_sketches(rng, n_images, depth, width))
    captions = Embeddings(unit_sets(rng, n_captions, k, d), sketches=unit_sketches(rng, n_captions, depth, width))
    rows, cols = similarity_module.chunk_shape(None, k, k)

    print(f"tfemde scoring benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {describe()}")
    print(f"         {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
          f"Python {platform.python_version()}, NumPy {np.__version__}, BLAS {blas_summary()}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, element-wise threads "
          f"{similarity_module._THREADS}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (other work on the machine "
          "slows both columns)")
    print(f"{n_images} image sets x {n_captions} caption sets, K = {k}, D = {d}, alpha = 16; chunks of "
          f"{rows} x {cols} items ({rows * k} x {cols * k} cosines); matmul = {n_images * k} x {d} @ {d} x "
          f"{n_captions * k}")
    print()
    header = (f"{'case':<26}{'score [s]':>10}{'matmul [s]':>11}{'ratio':>7}{'score cpu':>11}{'matmul cpu':>11}"
              f"{'ratio':>7}{'peak [MiB]':>11}{'max err':>9}")
    print(header)
    print("-" * len(header))
    results = []
    for name, weight in (("sets (Smooth-Chamfer)", 0.0), (f"sets + sketch {depth}x{width}", 0.5)):
        runs = []
        for _ in range(args.repeats):
            ref, ref_cpu = matmul_reference(images.sets, captions.sets, images.sketches if weight else None,
                                            captions.sketches if weight else None)
            scores, seconds, cpu, peak = timed_similarity(images, captions, weight)
            runs.append((seconds, ref, cpu, ref_cpu, peak))
        err = spot_check(scores, images, captions, weight, rng)
        del scores
        seconds, ref, cpu, ref_cpu = np.min(np.array(runs)[:, :4], axis=0)  # each the fastest of the repeats
        peak = max(r[4] for r in runs)
        results.append((name, seconds, ref))
        print(f"{name:<26}{seconds:>10.2f}{ref:>11.2f}{seconds / ref:>7.2f}{cpu:>11.2f}{ref_cpu:>11.2f}"
              f"{cpu / ref_cpu:>7.2f}{peak / 2**20:>11.0f}{err:>9.1e}", flush=True)
    print("-" * len(header))
    print("score/matmul: wall-clock seconds; cpu: CPU seconds of all threads of this process (less sensitive to "
          "other work on the machine)")
    print(f"peak [MiB]: NumPy memory traced during the call (the {n_images} x {n_captions} float32 result is "
          f"{n_images * n_captions * 4 / 2**20:.0f} MiB of it); process max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB including the inputs "
          f"({(images.sets.nbytes + captions.sets.nbytes) / 2**20:.0f} MiB of sets)")
    if not args.quick and n_images == 5000:
        worst = max(s for _, s, _ in results)
        worst_ratio = max(s / r for _, s, r in results)
        print(f"targets: <= 30 s ({'met' if worst <= 30 else 'missed'}: {worst:.1f} s) and <= 1.3 x matmul "
              f"({'met' if worst_ratio <= 1.3 else 'missed'}: {worst_ratio:.2f}); official PyTorch DivE: 61 s")


if __name__ == "__main__":
    main()
