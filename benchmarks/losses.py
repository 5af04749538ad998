"""The papers' hardest-negative triplet loss beside InfoNCE, at a longer budget, on the validation split.

Trains one preset on the built-in emoji data with each loss (everything else is `tfemde.training.runs.train`'s defaults with
the quickstart budget: the triplet runs warm up on all negatives (VSE0) for `warmup_epochs` before the hardest
negative, as VSE++ does), then prints each run's validation RSUM per epoch and its best, and draws both curves in
one PNG. Validation split only: this chooses a recipe, it does not report one.

    python benchmarks/losses.py                              # dive_temde, 30 epochs, triplet vs InfoNCE
    python benchmarks/losses.py --preset vse --epochs 10 --png losses.png
    python benchmarks/losses.py --quick                      # 1 epoch each: checks the script runs
"""

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _machine import describe

from tfemde.quickstart import BUDGET
from tfemde.training.runs import train

LOSSES = {"triplet (hardest negative, warm-up)": {"loss": "triplet"}, "InfoNCE (default)": {"loss": "info_nce"}}


def val_curve(run_dir) -> list:
    """The validation RSUM after each epoch, from a run's `history.csv`."""
    with open(Path(run_dir) / "history.csv") as f:
        return [float(row["val_rsum"]) for row in csv.DictReader(f)]


def plot(curves: dict, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation RSUM (of 600)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dive_temde")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-epochs", type=int, default=1, help="triplet epochs on all negatives first")
    parser.add_argument("--png", default="losses.png", help="where to draw the two validation curves")
    parser.add_argument("--json", default=None, help="also write the curves here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    print(describe())
    budget = {**BUDGET, "epochs": epochs}
    print(f"{args.preset}, {epochs} epochs, budget {budget}, seed {args.seed}\n")
    curves, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, loss in LOSSES.items():
            started = time.time()
            overrides = {**loss, "warmup_epochs": args.warmup_epochs} if loss["loss"] == "triplet" else loss
            run = train(data="emoji", preset=args.preset, seed=args.seed, out=Path(tmp) / loss["loss"], verbose=0,
                        **budget, **overrides)
            curves[name], seconds[name] = val_curve(run.path), time.time() - started
            print(f"{name}: {seconds[name]:.0f} s; validation RSUM per epoch: "
                  + " ".join(f"{v:.0f}" for v in curves[name]))
    print()
    for name, curve in curves.items():
        best = max(range(len(curve)), key=curve.__getitem__)
        print(f"{name:<38} best validation RSUM {curve[best]:.1f} (epoch {best + 1}), last {curve[-1]:.1f}")
    picture = plot(curves, args.png, f"{args.preset} on emoji: triplet vs InfoNCE")
    print(f"\ncurves: {picture}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "budget": budget, "seed": args.seed,
                                               "warmup_epochs": args.warmup_epochs, "curves": curves,
                                               "seconds": seconds, "machine": describe()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
