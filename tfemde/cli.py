"""The `tfemde` command: quickstart, train, evaluate, export, embed, index, search, data build-emoji.

Errors a user can fix (a bad path, an unknown preset, unreadable data) print one line, not a traceback
(set TFEMDE_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class UserError(Exception):
    """An error the user can fix from its message alone."""


def _overrides(pairs):
    """`["embed_dim=256", "sketch=false"]` -> `{"embed_dim": 256, "sketch": False}` (JSON values, else strings)."""
    values = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set expects KEY=VALUE; got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            values[key] = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def cmd_train(args):
    from tfemde.models import PRESETS
    from tfemde.runs import format_metrics, train

    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    run = train(data=args.data, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, out=args.out,
                vocab_size=args.vocab_size, seed=args.seed, **_overrides(args.set))
    print(format_metrics({args.preset: run.metrics}))
    print(f"run written to {run.path}")


def cmd_evaluate(args):
    from tfemde.evaluation import evaluate
    from tfemde.runs import format_metrics, open_run, resolve_dataset

    run = open_run(args.run_dir)
    dataset = resolve_dataset(args.data).split(args.split)
    metrics = evaluate(run.model, dataset, tokenizer=run.tokenizer, max_length=run.config.max_length,
                       protocol=args.protocol)
    print(format_metrics({f"{run.config.preset} ({args.split}, {args.protocol})": metrics}))
    out = Path(args.out or Path(args.run_dir) / f"metrics_{args.split}_{args.protocol}.json")
    out.write_text(json.dumps({k: float(v) for k, v in metrics.items()}, indent=2) + "\n")
    print(f"metrics written to {out}")


def cmd_quickstart(args):
    from tfemde.quickstart import quickstart

    quickstart(out=args.out, epochs=args.epochs, fast=args.fast)


def cmd_build_emoji(args):
    from tfemde.data.build_emoji import main as build_main

    argv = [args.out, "--size", str(args.size)] + (["--langs", *args.langs] if args.langs else [])
    return build_main(argv)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tfemde", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="train the default model and the VSE++ baseline on the emoji data")
    quick.add_argument("--out", default="runs/quickstart", help="folder for both runs and the pictures")
    quick.add_argument("--epochs", type=int, default=None, help="epochs per model (default: the quickstart budget)")
    quick.add_argument("--fast", action="store_true", help="a tiny run that only checks that everything works")
    quick.set_defaults(func=cmd_quickstart)

    tr = sub.add_parser("train", help="train a dual encoder with model.fit and write a run folder")
    tr.add_argument("--data", default="emoji", help="'emoji', a Karpathy JSON, a precomp folder or a JSONL file")
    tr.add_argument("--preset", default="dive_temde")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--vocab-size", type=int, default=2000)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="the run folder to write")
    tr.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config fields, e.g. embed_dim=256")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="R@K, RSUM, median and mean rank of a run on a split")
    ev.add_argument("run_dir")
    ev.add_argument("--data", default="emoji")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--protocol", default="full", choices=("full", "coco1k"))
    ev.add_argument("--out", help="the JSON to write (default RUN_DIR/metrics_SPLIT_PROTOCOL.json)")
    ev.set_defaults(func=cmd_evaluate)

    data = sub.add_parser("data", help="data-set tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build-emoji", help="rebuild the emoji data set from Debian's font and CLDR")
    build.add_argument("out")
    build.add_argument("--size", type=int, default=64)
    build.add_argument("--langs", nargs="*")
    build.set_defaults(func=cmd_build_emoji)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, UnicodeDecodeError) as error:
        if os.environ.get("TFEMDE_DEBUG"):
            raise
        print(f"tfemde {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tfemde {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
