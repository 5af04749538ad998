"""Approximate set retrieval at scale: `AnnSetIndex` (FAISS candidates, exact re-rank) against the exact `SetIndex`.

For N items of K = 4 elements of D = 256 (float32 sets: 4 KiB an item) it prints, for every candidate key
(`elements`, `elements+sketch`, `sketch`, `fde`) and FAISS index, the build time, the bytes per item of the FAISS
index and of the stored sets, and over the main search parameter (nprobe / efSearch, then k′): recall@10 of the
exact ranking and the latency per query at batch 1 and 64, next to the exact index's latency measured in the same
run. Two galleries:

- `clustered`: synthetic sets in clusters of 20 (as images of one concept are): each set is its cluster's prototype
  set plus Gaussian noise (cosine to the prototype about 0.9); queries are fresh noisy draws of random prototypes
  with twice the noise (a caption is further from its images than they are from each other); each sketch is the
  row-normalised exp of a random projection of the set's mean (depth 4 × 16).
- `emoji` (with `--run RUN_DIR`): the run's own image and caption embeddings of the built-in data; the 3,789 image
  sets are replicated to N with noise (each element + N(0, 0.3²/D) per coordinate, renormalised: cosine to its
  original about 0.96; sketch rows likewise), and the queries are the test split's caption embeddings.

Both sizes measure the element keys in an IVF index with float32 keys and with 4-bit product-quantised keys (FAISS
fast scan, 1/32 of the float32 bytes), and the element keys with their item's sketch appended (`elements+sketch`,
4-bit PQ); 1M also the PQ element keys refined by exact inner products (`refine=2`: from the stored sets; FAISS's
`RFlat`: from its own float32 copy); 100K also HNSW and the sketch and MUVERA keys. The chosen index (the fastest
at recall@10 >= 0.98) is then saved, as float32 and as float16, reloaded memory-mapped and searched again.

Targets (issue 14): recall@10 >= 0.98 at >= 20x lower latency per query than the exact index; with PQ, FAISS index
memory <= 1/4 of the float32 sets. Writes a JSON of every point and a recall-vs-latency plot (PNG).

    python benchmarks/ann.py --items 100000
    python benchmarks/ann.py --items 1000000 --run runs/quickstart/dive_temde --out benchmarks/results/ann_1m
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _machine import describe

from tfemde.serving import Embeddings, SetIndex
from tfemde.serving.ann import AnnSetIndex

K, D = 4, 256


def _normalise(x, axis=-1):
    x /= np.linalg.norm(x, axis=axis, keepdims=True)
    return x


def clustered(n, queries, seed=0, per_cluster=20, spread=0.5, depth=4, width=16):
    """`(items, queries, alpha, sketch_weight)` of the synthetic gallery (see the module docstring)."""
    rng = np.random.default_rng(seed)
    prototypes = _normalise(rng.standard_normal((max(1, n // per_cluster), K, D), dtype=np.float32))
    planes = rng.standard_normal((D, depth * width), dtype=np.float32)

    def draw(count, noise):
        sets = np.empty((count, K, D), np.float32)
        sketches = np.empty((count, depth, width), np.float32)
        for i in range(0, count, 65536):
            m = min(65536, count - i)
            x = prototypes[rng.integers(0, len(prototypes), size=m)]
            x = _normalise(x + noise / np.sqrt(D) * rng.standard_normal((m, K, D), dtype=np.float32))
            sets[i:i + m] = x
            s = np.exp(3 * x.mean(axis=1) @ planes).reshape(m, depth, width)
            sketches[i:i + m] = _normalise(s)
        return Embeddings(sets, sketches=sketches)

    return draw(n, spread), draw(queries, 2 * spread), 16.0, 0.5


def emoji(run_dir, n, queries, seed=0, noise=0.3):
    """`(items, queries, alpha, sketch_weight)`: a run's emoji embeddings, the images replicated to `n` with noise."""
    from tfemde.data import load
    from tfemde.evaluation import encode_dataset
    from tfemde.training.runs import open_run

    run = open_run(run_dir)
    data = load("emoji")
    images, _ = encode_dataset(run.model, data, run.tokenizer)
    _, captions = encode_dataset(run.model, data.split("test"), run.tokenizer)
    rng = np.random.default_rng(seed)
    depth = images.sketch_depth
    sets = np.empty((n, *images.sets.shape[1:]), np.float32)
    sketches = np.empty((n, images.sketch_dim), np.float32)
    for i in range(0, n, 65536):
        m = min(65536, n - i)
        src = np.arange(i, i + m) % len(images)  # every image once, then its noisy copies
        fresh = (np.arange(i, i + m) < len(images))[:, None, None]
        x = images.sets[src] + ~fresh * noise / np.sqrt(D) * rng.standard_normal((m, *sets.shape[1:]),
                                                                               dtype=np.float32)
        sets[i:i + m] = _normalise(x)
        s = images.sketches[src].reshape(m, depth, -1)
        s = np.abs(s + ~fresh * noise / np.sqrt(s.shape[-1]) * rng.standard_normal(s.shape, dtype=np.float32))
        sketches[i:i + m] = _normalise(s).reshape(m, -1)
    pick = rng.choice(len(captions), size=min(queries, len(captions)), replace=False)
    return (Embeddings(sets, sketches=sketches, sketch_depth=depth), captions[np.sort(pick)], run.config.alpha,
            run.config.sketch_weight)


# With RFlat or refine: 2 x neighbours keys ranked by their PQ codes, the best neighbours kept by exact inner products
# (RFlat: from FAISS's float32 copy of the keys; refine: from the stored sets, so FAISS holds only the codes).
REFINE_FACTOR = 2


def per_query_ms(search, queries, batch, repeats):
    """Median wall ms per query of `search(queries[i:i+batch])` over `repeats` calls."""
    times = []
    for r in range(repeats):
        i = (r * batch) % max(1, len(queries) - batch + 1)
        start = time.perf_counter()
        search(queries[i:i + batch])
        times.append((time.perf_counter() - start) * 1000 / batch)
    return float(np.median(times))


def recall_at(got, want):
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got.tolist(), want.tolist())]))


def faiss_bytes(index) -> int:
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index._faiss_index, os.path.join(tmp, "i"))
        return os.path.getsize(os.path.join(tmp, "i"))


def configs(n, sketch_dim):
    """`(key, factory, neighbours, parameter name, sweep, refine)`: the indexes measured at `n` items.

    Inverted lists: about 2·√keys (k-means on 40 keys a list stays within minutes on two cores at 4M keys). PQ:
    4 dimensions a 4-bit code (1/32 of the float32 bytes)."""
    nlist = 1 << int(round(np.log2(2 * np.sqrt(n * K))))
    nlist_items = 1 << int(round(np.log2(2 * np.sqrt(n))))
    probes = [1, 4, 16, 32, 64, 128]
    efs = [64, 128, 256, 512]
    out = [("elements", f"IVF{nlist},Flat", 256, "nprobe", probes, 1),
           ("elements", f"IVF{nlist},PQ{D // 4}x4fs", 256, "nprobe", probes, 1),
           ("elements+sketch", f"IVF{nlist},PQ{(D + sketch_dim) // 4}x4fs", 256 if n <= 200_000 else 1024,
            "nprobe", [4, 8, 16, 32] if n > 200_000 else probes, 1)]
    if n > 200_000:  # near-copies crowd the candidates at 1M: many PQ candidates, kept by exact inner products
        out += [("elements", f"IVF{nlist},PQ{D // 4}x4fs", 2048, "nprobe", [8, 16, 32, 64], REFINE_FACTOR),
                ("elements", f"IVF{nlist},PQ{D // 4}x4fs,RFlat", 2048, "nprobe", [16, 32, 64], 1)]
    if n <= 200_000:  # the single-vector keys (and HNSW, whose build is slow) only at the smaller size
        out += [("sketch", f"IVF{nlist_items},Flat", 1024, "nprobe", probes, 1),
                ("fde", f"IVF{nlist_items},Flat", 1024, "nprobe", probes, 1),
                ("elements", "HNSW32", 256, "efSearch", efs, 1), ("sketch", "HNSW32", 1024, "efSearch", efs, 1),
                ("fde", "HNSW32", 1024, "efSearch", efs, 1)]
    return out


def label(entry) -> str:
    """The index's name in the table and plot: its factory, and `+ refine ×r` when the stored sets refine."""
    return entry["factory"] + (f" + refine ×{entry['refine']}" if entry.get("refine", 1) > 1 else "")


def chosen(points, param):
    """The fastest point at recall@10 >= 0.98, else the one of highest recall."""
    good = [p for p in points if p["recall@10"] >= 0.98]
    return min(good, key=lambda p: p["ms_batch1"]) if good else max(points, key=lambda p: p["recall@10"])


def run_gallery(name, items, queries, alpha, sketch_weight, k, n_exact_single, only, factories=None):
    n = len(items)
    print(f"\n== {name}: {n:,} items of [{K}, {D}] (+ sketch {items.sketch_dim}), {len(queries)} queries, "
          f"alpha {alpha}, sketch weight {sketch_weight} ==", flush=True)
    exact = SetIndex(alpha=alpha, sketch_weight=sketch_weight)
    exact.add(items)
    start = time.perf_counter()
    want, _ = exact.search(queries, k=k)
    exact_all = time.perf_counter() - start
    # the median of 3 batches: a single batch read 58 to 94 ms a query in different runs (1M emoji gallery)
    exact_64 = per_query_ms(lambda q: exact.search(q, k=k), queries, 64, 3)
    exact_1 = per_query_ms(lambda q: exact.search(q, k=k), queries, 1, n_exact_single)
    print(f"exact SetIndex: {exact_1:.1f} ms per query at batch 1, {exact_64:.1f} ms at batch 64 "
          f"({len(queries)} queries in {exact_all:.1f} s); sets {items.sets.nbytes / n:.0f} B per item", flush=True)
    result = {"items": n, "queries": len(queries), "alpha": alpha, "sketch_weight": sketch_weight,
              "exact_ms_batch1": exact_1, "exact_ms_batch64": exact_64, "set_bytes_per_item": items.sets.nbytes / n,
              "indexes": []}
    del exact
    kept = None  # (point, index): the fastest index at recall@10 >= 0.98 so far (else the best recall), kept
    for key, factory, neighbours, param, sweep, refine in configs(n, items.sketch_dim):
        index_name = label({"factory": factory, "refine": refine})
        if (only and key not in only) or (factories and not any(f in index_name for f in factories)):
            continue
        index = AnnSetIndex(alpha=alpha, sketch_weight=sketch_weight, key=key, factory=factory, neighbours=neighbours,
                            search_params={"k_factor_rf": REFINE_FACTOR} if factory.endswith(",RFlat") else None,
                            refine=refine)
        start = time.perf_counter()
        index.add(items)
        build = time.perf_counter() - start
        size = faiss_bytes(index)
        entry = {"key": key, "factory": factory, "refine": refine, "build_s": build, "faiss_bytes_per_item": size / n,
                 "neighbours": neighbours, "parameter": param, "points": []}
        print(f"{key:>8} {index_name:<18} built in {build:6.1f} s, FAISS {size / n:7.0f} B per item "
              f"({size / items.sets.nbytes:.2f} of the float32 sets)", flush=True)

        def measure(value, nb):
            params = {param: value}
            search = lambda q: index.search(q, k=k, neighbours=nb, search_params=params)  # noqa: E731
            got, _ = search(queries)
            point = {param: value, "neighbours": nb, "recall@10": recall_at(got, want),
                     "ms_batch1": per_query_ms(search, queries, 1, 30),
                     "ms_batch64": per_query_ms(search, queries, 64, 3)}
            point["speedup_batch1"] = exact_1 / point["ms_batch1"]
            point["speedup_batch64"] = exact_64 / point["ms_batch64"]
            print(f"{'':>9} {param}={value:<4} k'={nb:<4} recall@10 {point['recall@10']:.3f}  batch 1 "
                  f"{point['ms_batch1']:7.2f} ms ({point['speedup_batch1']:6.1f}x)  batch 64 "
                  f"{point['ms_batch64']:7.2f} ms ({point['speedup_batch64']:6.1f}x)", flush=True)
            entry["points"].append(point)

        for value in sweep:
            measure(value, neighbours)
        best = chosen(entry["points"], param)
        for nb in (neighbours // 4, neighbours // 2, neighbours * 2, neighbours * 5 // 2, neighbours * 3,
                   neighbours * 4):
            measure(best[param], nb)
        result["indexes"].append(entry)
        best = chosen(entry["points"], param)
        if kept is None or chosen([kept[0], best], param) is best:  # kept for the out-of-core check
            index.search_params, index.neighbours = {param: best[param]}, best["neighbours"]
            kept = (best, index)
        del index
    return result, kept[1]


def out_of_core(index, queries, k, folder):
    """Save the chosen index (float32, and float16 from the same FAISS index), reload both memory-mapped, and
    compare their rankings and latency with the index in memory."""
    memory = index.search(queries, k=k)[0]
    rows = {}
    for dtype in ("float32", "float16"):
        path = index.save(Path(folder) / f"index_{dtype}", store_dtype=dtype)
        start = time.perf_counter()
        loaded = AnnSetIndex.load(path)
        load_s = time.perf_counter() - start
        got = loaded.search(queries, k=k)[0]
        rows[dtype] = {"load_s": load_s, "same_as_in_memory": bool((got == memory).all()),
                       "ms_batch1": per_query_ms(lambda q: loaded.search(q, k=k), queries, 1, 30),
                       "ms_batch64": per_query_ms(lambda q: loaded.search(q, k=k), queries, 64, 3), "ids": got}
        del loaded
    rows["float16"]["recall_vs_float32"] = recall_at(rows["float16"]["ids"], rows["float32"]["ids"])
    for dtype in rows:
        del rows[dtype]["ids"]
        print(f"memory-mapped {dtype}: loaded and verified in {rows[dtype]['load_s']:.1f} s, "
              f"{rows[dtype]['ms_batch1']:.2f} ms per query at batch 1, {rows[dtype]['ms_batch64']:.2f} at 64; "
              + (f"top-10 agreement with float32 {rows[dtype]['recall_vs_float32']:.3f}" if dtype == "float16" else
                 f"same ranking as in memory: {rows[dtype]['same_as_in_memory']}"), flush=True)
    return rows


def plot(results, path):
    """Recall@10 against ms per query, at batch 1 (top row) and batch 64 (bottom row), one column per gallery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 9.6), squeeze=False)
    for row, batch in enumerate((1, 64)):
        ms, exact_ms = f"ms_batch{batch}", f"exact_ms_batch{batch}"
        for ax, (name, result) in zip(axes[row], results.items()):
            for entry in result["indexes"]:
                points = [p for p in entry["points"] if p["neighbours"] == entry["neighbours"]]
                line, = ax.plot([p[ms] for p in points], [p["recall@10"] for p in points], marker="o",
                                label=f"{entry['key']} · {label(entry)} (k′={entry['neighbours']}; dashed: k′)")
                best = chosen(points, entry["parameter"])
                over_k = sorted([p for p in entry["points"] if p[entry["parameter"]] == best[entry["parameter"]]],
                                key=lambda p: p["neighbours"])
                ax.plot([p[ms] for p in over_k], [p["recall@10"] for p in over_k], ls="--", marker=".",
                        color=line.get_color(), alpha=0.7)
            ax.axvline(result[exact_ms] / 20, color="grey", ls=":", label="exact / 20")
            ax.axhline(0.98, color="grey", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"ms per query, batch {batch} (log)")
            ax.set_ylabel("recall@10 of the exact ranking")
            ax.set_title(f"{name}: {result['items']:,} items, batch {batch}, exact {result[exact_ms]:.0f} ms/query")
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _times(ratio: float) -> str:
    """A speed-up as the table shows it: one decimal below 100 (so that 19.7 never reads as 20)."""
    return f"{ratio:.1f}×" if ratio < 100 else f"{ratio:.0f}×"


def markdown(paths) -> str:
    """README rows from result JSONs: per gallery and size, the exact index and each index's fastest point at
    recall@10 >= 0.98 (else its best recall)."""
    rows = ["| gallery, items | candidate key · FAISS index | build | FAISS bytes / item | parameter, k′ "
            "| recall@10 | ms / query, batch 1 (× exact) | ms / query, batch 64 (× exact) |", "| --- " * 8 + "|"]
    for path in paths:
        for name, result in json.loads(Path(path).read_text())["results"].items():
            n = result["items"]
            where = f"{name}, {n / 1e6:g}M" if n >= 1_000_000 else f"{name}, {n // 1000:,}K"
            rows.append(f"| {where} | exact `SetIndex` | – | {result['set_bytes_per_item']:.0f} (sets) | – | 1 | "
                        f"{result['exact_ms_batch1']:.1f} | {result['exact_ms_batch64']:.1f} |")
            for entry in result["indexes"]:
                point = chosen(entry["points"], entry["parameter"])
                rows.append(f"| {where} | {entry['key']} · `{label(entry)}` | {entry['build_s']:.0f} s | "
                            f"{entry['faiss_bytes_per_item']:.0f} | {entry['parameter']} "
                            f"{point[entry['parameter']]}, {point['neighbours']} | {point['recall@10']:.3f} | "
                            f"{point['ms_batch1']:.2f} ({_times(point['speedup_batch1'])}) | {point['ms_batch64']:.2f} "
                            f"({_times(point['speedup_batch64'])}) |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--run", help="a trained run folder: adds the emoji gallery of its embeddings")
    parser.add_argument("--only", nargs="*", default=None, help="candidate keys to measure (default: all)")
    parser.add_argument("--skip-clustered", action="store_true")
    parser.add_argument("--factories", nargs="*", default=None,
                        help="measure only the FAISS factories containing one of these strings (e.g. RFlat)")
    parser.add_argument("--update", action="store_true",
                        help="keep the galleries of the --out JSON that this run does not measure (--skip-clustered)")
    parser.add_argument("--replot", nargs="*", help="redraw the PNG of these result JSONs and stop")
    parser.add_argument("--table", nargs="*", help="print README rows from these result JSONs and stop")
    parser.add_argument("--out", default=None, help="path stem for the .json and .png (default: "
                                                    "benchmarks/results/ann_<items>)")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(args.table))
        return 0
    if args.replot:
        for path in args.replot:
            plot(json.loads(Path(path).read_text())["results"], Path(path).with_suffix(".png"))
        return 0
    machine = describe()
    print(machine)
    out = Path(args.out or Path(__file__).parent / "results" / f"ann_{args.items // 1000}k")
    galleries = {}
    if not args.skip_clustered:
        galleries["clustered"] = lambda: clustered(args.items, args.queries)
    if args.run:
        galleries["emoji"] = lambda: emoji(args.run, args.items, args.queries)
    results = {}
    for name, make in galleries.items():
        items, queries, alpha, sketch_weight = make()
        results[name], kept = run_gallery(name, items, queries, alpha, sketch_weight, 10, 3, args.only,
                                          args.factories)
        results[name]["machine"] = machine
        best = [(e, p) for e in results[name]["indexes"] for p in e["points"] if p["recall@10"] >= 0.98]
        if not best:
            best = [max(((e, p) for e in results[name]["indexes"] for p in e["points"]),
                        key=lambda ep: ep[1]["recall@10"])]
        if best:
            entry, point = min(best, key=lambda ep: ep[1]["ms_batch1"])
            results[name]["chosen"] = {"key": entry["key"], "factory": entry["factory"], "refine": entry["refine"],
                                       **point}
            print(f"fastest at recall@10 >= 0.98 (else the best recall): {entry['key']} {label(entry)} "
                  f"{entry['parameter']}="
                  f"{point[entry['parameter']]} k'={point['neighbours']}: {point['ms_batch1']:.2f} ms "
                  f"({point['speedup_batch1']:.1f}x the exact index) at batch 1, {point['speedup_batch64']:.1f}x at "
                  "batch 64", flush=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as folder:
                results[name]["out_of_core"] = out_of_core(kept, queries, 10, folder)
        del items, queries, kept
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.update and out.with_suffix(".json").exists():
        earlier = json.loads(out.with_suffix(".json").read_text())
        results = {**earlier["results"], **results}  # each gallery keeps the machine line it was measured on
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
