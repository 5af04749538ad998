"""What the T-EMDE sketch contributes to a trained run, on its validation split.

Prints validation RSUM scored by the set similarity alone, by the sketch cosine alone and by their sum at several
weights λ (the run's own λ marked), the mean sketch cosine of matching and of all image/caption pairs, and how
spread the tokens' soft bucket assignments are (the mean entropy of a sketch row, in nats; `log(2**bits)` means
every row is flat, i.e. the sketch says nothing).

    python benchmarks/sketch_contribution.py runs/quickstart/dive_temde
    python benchmarks/sketch_contribution.py RUN_DIR --data emoji --split val --weights 0 0.5 1 2
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from _machine import describe

from tfemde.data import eval_dataset
from tfemde.evaluation import encode_dataset, full, retrieval_metrics
from tfemde.training.runs import open_run, resolve_dataset


def row_entropy(sketches: np.ndarray) -> float:
    """Mean entropy (nats) of the rows of `[N, depth, width]` L2-normalised sketches, read as distributions p²."""
    p = np.square(sketches)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
    return float(np.mean(-(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", default="emoji")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--weights", nargs="*", type=float, default=[0.25, 0.5, 1.0, 2.0, 4.0])
    args = parser.parse_args(argv)

    run = open_run(args.run_dir)
    config = run.model.config
    if not config.sketch:
        parser.error(f"run {args.run_dir} has no sketch (preset {config.preset})")
    dataset = resolve_dataset(args.data).split(args.split)
    data = eval_dataset(dataset, run.tokenizer, 256, max_length=config.max_length)
    items, captions = encode_dataset(run.model, data)
    print(f"sketch contribution; machine: {describe()}")
    print(f"run {args.run_dir} ({config.preset}, sketch {config.sketch_depth} x 2^{config.sketch_bits}, temperature "
          f"{config.sketch_temperature}, layer_norm {config.sketch_layer_norm}, λ {config.sketch_weight}); "
          f"{args.split} split: {len(items)} items, {len(captions)} captions\n")

    def rsum(weight):
        return full(items, captions, data.caption_item, data.item_group, alpha=config.alpha,
                    sketch_weight=weight)["rsum"]

    depth = config.sketch_depth
    item_rows = items.sketches.reshape(len(items), depth, -1)
    caption_rows = captions.sketches.reshape(len(captions), depth, -1)
    cosine = np.einsum("cnw,inw->ci", caption_rows, item_rows) / depth
    print(f"{'scored by':<32}{'RSUM':>8}")
    print(f"{'set similarity alone':<32}{rsum(0.0):>8.1f}")
    print(f"{'sketch cosine alone':<32}{retrieval_metrics(cosine.T, data.caption_item, data.item_group)['rsum']:>8.1f}")
    for weight in args.weights:
        mark = "  (the run's)" if weight == config.sketch_weight else ""
        print(f"{f'set + {weight:g} x sketch':<32}{rsum(weight):>8.1f}{mark}")
    matching = cosine[np.arange(len(captions)), data.caption_item]
    print(f"\nsketch cosine: matching pairs {matching.mean():.3f}, all pairs {cosine.mean():.3f} ± {cosine.std():.3f}")
    print(f"row entropy (nats; {np.log(item_rows.shape[-1]):.2f} = flat): images {row_entropy(item_rows):.2f}, "
          f"captions {row_entropy(caption_rows):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
