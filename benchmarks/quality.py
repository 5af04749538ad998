"""Retrieval quality of every preset on the built-in emoji data, same budget, several seeds.

Prints test R@1/5/10 both ways and RSUM as mean ± std over seeds, the training-split RSUM and the concept queries
(every concept's name searched over all images, hit@1/5/10 for train- and test-split concepts), and whether
`dive_temde` beats `vse` and `vse_infty` in RSUM beyond the spread (its mean minus its std above their mean plus
their std).

    python benchmarks/quality.py                 # all presets, 3 seeds, the quickstart budget
    python benchmarks/quality.py --quick         # 2 presets, 1 seed, 1 epoch: checks the script runs
    python benchmarks/quality.py --presets vse dive_temde --seeds 0 1 2 --epochs 8
    python benchmarks/quality.py --presets dive --threads 1 --json a.json   # parts in parallel, then
    python benchmarks/quality.py --merge a.json b.json                      # one table from their results
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

from tfemde.evaluation import concept_queries, evaluate, format_metrics, mean_std
from tfemde.models import PRESETS
from tfemde.quickstart import BUDGET
from tfemde.training.runs import train

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=sorted(PRESETS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=BUDGET["epochs"])
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--caption-parts", action="store_true",
                        help="also train on the parts of comma-separated training captions (train(caption_parts=True))")
    parser.add_argument("--threads", type=int, default=None, help="TensorFlow intra-op threads (default: all)")
    parser.add_argument("--merge", nargs="*", default=None, help="print one table from these --json files")
    args = parser.parse_args(argv)
    if args.merge:
        raw, budget = {}, None
        for path in args.merge:
            part = json.loads(Path(path).read_text())
            budget = part["budget"]
            for name, runs in part["results"].items():
                raw.setdefault(name, []).extend(runs)
        print(f"merged {len(args.merge)} result files; budget per run: {budget}\n")
        report(raw)
        if args.json:
            Path(args.json).write_text(json.dumps({"budget": budget, "results": raw}, indent=2) + "\n")
        return 0
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.quick:
        args.presets, args.seeds, args.epochs = ["vse", "dive_temde"], [0], 1
    budget = {**BUDGET, "epochs": args.epochs, **({"caption_parts": True} if args.caption_parts else {})}
    out = Path(args.out or tempfile.mkdtemp(prefix="tfemde-quality-"))

    print(f"tfemde quality benchmark; machine: {describe()}")
    print(f"data: emoji (built-in), test split, group-aware; budget per run: {budget}; seeds {args.seeds}\n")
    raw = {}
    for name in args.presets:
        for seed in args.seeds:
            started = time.time()
            run = train(data="emoji", preset=name, seed=seed, out=out / f"{name}-seed{seed}", verbose=0,
                        overwrite=True, **budget)
            concepts = concept_queries(run, "emoji")
            train_rsum = evaluate(run, "emoji", split="train", progress=False)["rsum"]
            val_rsum = json.loads((run.path / "best.json").read_text())["best"]  # what the defaults were chosen on
            raw.setdefault(name, []).append({**run.metrics, "train_rsum": train_rsum, "val_rsum": val_rsum,
                                             **{f"concepts_{split}_{k}": c[k] for split, c in concepts.items()
                                                for k in ("hit@1", "hit@5", "hit@10")},
                                             **{f"concepts_{split}_{part}_hit@5": c[part]["hit@5"]
                                                for split, c in concepts.items()
                                                for part in ("seen_words", "unseen_words", "new_images") if part in c}})
            print(f"  {name:<11} seed {seed}: RSUM {run.metrics['rsum']:6.1f}, validation RSUM {val_rsum:6.1f}, "
                  f"train-split RSUM {train_rsum:6.1f}, "
                  f"concept hit@5 train {concepts['train']['hit@5']:.1f} / test {concepts['test']['hit@5']:.1f}  "
                  f"({time.time() - started:.0f} s)", flush=True)
            if args.json:  # after every run, so an interrupted benchmark keeps what it measured
                write_json(args.json, {"budget": budget, "seeds": args.seeds, "results": raw})

    report(raw)
    return 0


def write_json(path, results):
    text = json.dumps(results, indent=2) + "\n"
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report(raw):
    """Print the mean ± std table of `{preset: [metrics per seed]}` and the dive_temde verdicts."""
    table = {name: {k: mean_std([m[k] for m in runs]) for k in KEYS} for name, runs in raw.items()}
    print("\nTest retrieval, mean ± std over seeds (recalls in %, RSUM max 600):")
    print(format_metrics(table))
    if all("concepts_train_hit@5" in m for runs in raw.values() for m in runs):
        print("\nTraining-split RSUM and concept queries (each concept's name over all images; hit@K in %):")
        for name, runs in raw.items():
            cells = [f"train RSUM {mean_std([m['train_rsum'] for m in runs])}"]
            if all("val_rsum" in m for m in runs):  # results written before it was recorded have none
                cells.append(f"validation RSUM {mean_std([m['val_rsum'] for m in runs])}")
            cells += [
                f"{split} hit@{k} {mean_std([m[f'concepts_{split}_hit@{k}'] for m in runs])}"
                for split in ("train", "test") for k in (1, 5, 10)]
            cells += [  # results written before the split by words have none
                f"test hit@5 {label} {mean_std([m[f'concepts_test_{part}_hit@5'] for m in runs])}"
                for part, label in (("seen_words", "(names of training words)"),
                                    ("unseen_words", "(names with an unseen word)"),
                                    ("new_images", "(over the non-training images only)"))
                if all(f"concepts_test_{part}_hit@5" in m for m in runs)]
            print(f"  {name:<11} " + "  ".join(cells))
    if "dive_temde" in raw:
        best = np.array([m["rsum"] for m in raw["dive_temde"]])
        for baseline in ("vse", "vse_infty"):
            if baseline in raw:
                other = np.array([m["rsum"] for m in raw[baseline]])
                margin = (best.mean() - best.std()) - (other.mean() + other.std())
                verdict = "beats" if margin > 0 else "does NOT beat"
                print(f"dive_temde {verdict} {baseline} beyond the spread (margin {margin:+.1f} RSUM)")


if __name__ == "__main__":
    sys.exit(main())
