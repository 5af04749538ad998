"""Two art styles of the emoji set: image-to-image retrieval across styles, centroid galleries and the centroid loss.

dive_temde at the quickstart budget (6 epochs, batch 64, `tfemde.quickstart.BUDGET`), three training arms, each
with `--seeds` seeds:

- `noto`: the default data (Noto only);
- `both`: Noto and Twemoji images of the same concepts (`load("emoji", styles=("noto", "twemoji"))`), InfoNCE;
- `both + centroid`: the same with the centroid triplet loss (`centroid_weight`, default 1.0) on P x M batches
  (`instances_per_group=2`: 32 concepts x 2 images a batch).

Every trained model is measured on the test split (its checkpoint chosen on validation RSUM, nothing tuned here):
Twemoji -> Noto image retrieval (mAP, R@1) against the full Noto gallery and against centroid galleries (one entry
per concept: slot_mean, kmeans, union), and text -> image RSUM on each style alone. For the full and centroid
galleries it also prints the entries, the bytes of the sets and the time per query of `SetIndex.search` (NumPy,
batch of all test queries, best of 3).

    python benchmarks/styles.py                  # 3 seeds (about 45 minutes on 2 cores)
    python benchmarks/styles.py --seeds 1
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from _machine import describe  # noqa: E402
from tfemde.data import load  # noqa: E402
from tfemde.evaluation import encode_items, evaluate  # noqa: E402
from tfemde.evaluation.model import evaluate_images  # noqa: E402
from tfemde.quickstart import BUDGET  # noqa: E402
from tfemde.serving import SetIndex  # noqa: E402
from tfemde.serving.centroids import METHODS, group_centroids  # noqa: E402
from tfemde.training.runs import train  # noqa: E402

RESULTS = Path(__file__).with_name("results") / "styles.json"
ARMS = {
    "noto": dict(styles=("noto",), overrides={}, instances_per_group=0),
    "both": dict(styles=("noto", "twemoji"), overrides={}, instances_per_group=0),
    "both + centroid": dict(styles=("noto", "twemoji"), overrides={"centroid_weight": 1.0}, instances_per_group=2),
}


def gallery_costs(run, test):
    """Entries, bytes of the sets and seconds per query for the full Noto gallery and each centroid gallery."""
    items = encode_items(run.model, test, run.tokenizer)
    queries = items.take(np.flatnonzero(test.item_styles == "twemoji"))
    noto = np.flatnonzero(test.item_styles == "noto")
    full = items.take(noto)
    galleries = {"full": (full, np.arange(len(noto)))}
    for method in METHODS:
        galleries[f"centroids ({method})"] = group_centroids(full, test.item_group[noto], method)
    out = {}
    for name, (embeddings, ids) in galleries.items():
        index = SetIndex(alpha=run.config.alpha, sketch_weight=run.config.sketch_weight)
        index.add(embeddings, ids=np.asarray(ids))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            index.search(queries, k=10)
            best = min(best, time.perf_counter() - start)
        sketch_bytes = 0 if embeddings.sketches is None else embeddings.sketches.nbytes
        out[name] = {"entries": len(embeddings), "bytes": int(embeddings.sets.nbytes + sketch_bytes),
                     "ms_per_query": 1e3 * best / len(queries)}
    return out


def slot_alignment(run, test):
    """Does slot k mean the same thing across images? For every test concept drawn in both styles, its Noto and
    Twemoji sets: the mean cosine of same-index slots, of the best slot permutation, and how often the identity is
    the best permutation (chance: 1/K!)."""
    from itertools import permutations

    items = encode_items(run.model, test, run.tokenizer)
    sets = items.sets
    first = {}
    for style in ("noto", "twemoji"):
        for item in np.flatnonzero(test.item_styles == style):
            first.setdefault((style, int(test.item_group[item])), item)
    pairs = [(first[("noto", g)], first[("twemoji", g)]) for (s, g) in first if s == "noto" and ("twemoji", g) in first]
    k = sets.shape[1]
    orders = [list(p) for p in permutations(range(k))]
    aligned, best, identity = [], [], 0
    for a, b in pairs:
        cosines = sets[a] @ sets[b].T  # [K, K]
        scores = [float(np.mean(cosines[np.arange(k), order])) for order in orders]
        aligned.append(scores[0])
        best.append(max(scores))
        identity += int(np.argmax(scores) == 0)
    return {"pairs": len(pairs), "same_index_cosine": float(np.mean(aligned)),
            "best_permutation_cosine": float(np.mean(best)), "identity_is_best": identity / max(len(pairs), 1),
            "chance": 1.0 / len(orders)}


def measure(run, test):
    record = {}
    record["i2i"] = {"full": evaluate_images(run, test, "twemoji", "noto", progress=False)}
    for method in METHODS:
        record["i2i"][f"centroids ({method})"] = evaluate_images(run, test, "twemoji", "noto", gallery="centroids",
                                                                 centroid_method=method, progress=False)
    for style in ("noto", "twemoji"):
        one = test.subset(np.flatnonzero(test.item_styles == style))
        record[f"t2i_rsum_{style}"] = evaluate(run, one, progress=False)["rsum"]
    record["galleries"] = gallery_costs(run, test)
    record["slot_alignment"] = slot_alignment(run, test)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    args = parser.parse_args(argv)
    print(f"# {describe()}")
    test = load("emoji", styles=("noto", "twemoji"), split="test")
    results = {"machine": describe(), "budget": BUDGET, "arms": {}}
    for arm in args.arms.split(","):
        spec = ARMS[arm]
        data = load("emoji", styles=spec["styles"])
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as folder:
                started = time.time()
                run = train(data=data, preset="dive_temde", out=Path(folder) / "run", verbose=0, seed=seed,
                            instances_per_group=spec["instances_per_group"], **BUDGET, **spec["overrides"])
                minutes = (time.time() - started) / 60
                record = {"seed": seed, "train_minutes": round(minutes, 1),
                          "val_rsum": json.loads((Path(folder) / "run" / "best.json").read_text())["best"],
                          **measure(run, test)}
            results["arms"].setdefault(arm, []).append(record)
            i2i = record["i2i"]
            print(f"{arm:16s} seed {seed}: i2i mAP full {i2i['full']['map']:5.1f} R@1 {i2i['full']['r1']:5.1f} | "
                  f"centroids slot_mean mAP {i2i['centroids (slot_mean)']['map']:5.1f} | t2i RSUM noto "
                  f"{record['t2i_rsum_noto']:5.1f} twemoji {record['t2i_rsum_twemoji']:5.1f} | "
                  f"{minutes:.1f} min", flush=True)
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {RESULTS}")
    return 0


def _mean_std(values):
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.1f} ± {values.std():.1f}"


def print_table(results):
    """The README table: mean ± std over seeds."""
    arms = results["arms"]
    galleries = ["full"] + [f"centroids ({m})" for m in METHODS]
    print("\n| training | gallery | Twemoji→Noto mAP | R@1 | text→image RSUM, Noto | Twemoji |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm, records in arms.items():
        for gallery in galleries:
            maps = [r["i2i"][gallery]["map"] for r in records]
            r1 = [r["i2i"][gallery]["r1"] for r in records]
            t2i = (_mean_std([r["t2i_rsum_noto"] for r in records]), _mean_std([r["t2i_rsum_twemoji"] for r in records])
                   ) if gallery == "full" else ("", "")
            print(f"| {arm} | {gallery} | {_mean_std(maps)} | {_mean_std(r1)} | {t2i[0]} | {t2i[1]} |")
    first = next(iter(arms.values()))[0]["galleries"]
    print("\n| gallery | entries | bytes (sets + sketches) | ms per query (NumPy, exact) |")
    print("| --- | --- | --- | --- |")
    for name in galleries:
        cost = first[name]
        print(f"| {name} | {cost['entries']} | {cost['bytes']:,} | {cost['ms_per_query']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
