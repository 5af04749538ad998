"""`tfemde train`, `evaluate`, `quickstart`, `export` and `data build-emoji`: the commands that need the `train` extra
(TensorFlow is imported inside each command, after the arguments are parsed)."""

from __future__ import annotations

import json
from pathlib import Path

from tfemde.cli.errors import UserError, out_file
from tfemde.files import atomic_write


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


# `train`'s own options: a `--set` of one of these would reach `train` twice.
TRAIN_OPTIONS = {"data": "--data", "preset": "--preset", "epochs": "--epochs", "batch_size": "--batch-size",
                 "vocab_size": "--vocab-size", "seed": "--seed", "out": "--out", "overwrite": "--overwrite",
                 "bucket_width": "--bucket-width", "balance_groups": "--balance-groups", "augment": "--augment",
                 "strategy": "--distribute", "instances_per_group": "--instances-per-group",
                 "caption_parts": "--caption-parts"}
TRAIN_ONLY = ("verbose", "validate_every", "callbacks")


def cmd_train(args):
    from tfemde.models import PRESETS
    from tfemde.evaluation import format_metrics
    from tfemde.training.distribute import make_strategy
    from tfemde.training.runs import train

    strategy = make_strategy(args.distribute)  # before any other TensorFlow work (MultiWorkerMirroredStrategy)
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    overrides = _overrides(args.set)
    for key in overrides:
        if key in TRAIN_OPTIONS:
            raise UserError(f"--set {key}=...: {key} is an option of train, not a config field; use "
                            f"{TRAIN_OPTIONS[key]} instead")
        if key in TRAIN_ONLY:
            raise UserError(f"--set {key}=...: {key} is not a config field")
    data = args.data
    if args.styles:
        from tfemde.data import load

        if args.data != "emoji":
            raise UserError("--styles applies to --data emoji only")
        data = load("emoji", styles=tuple(s.strip() for s in args.styles.split(",") if s.strip()))
    run = train(data=data, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, out=args.out,
                vocab_size=args.vocab_size, seed=args.seed, overwrite=args.overwrite, bucket_width=args.bucket_width,
                balance_groups=args.balance_groups, augment=args.augment, strategy=strategy,
                instances_per_group=args.instances_per_group, caption_parts=args.caption_parts, **overrides)
    if run is None:
        print("worker done: the chief wrote the run folder")
        return
    print(format_metrics({args.preset: run.metrics}))
    print(f"run written to {run.path}")


def cmd_evaluate(args):
    from tfemde.data import load
    from tfemde.evaluation import evaluate, format_metrics
    from tfemde.models.run_folder import open_run, resolve_dataset

    out = out_file(args.out) if args.out else None
    i2i = args.task == "i2i"
    if i2i and not (args.query_style and args.gallery_style):
        raise UserError("--task i2i needs --query-style and --gallery-style (e.g. twemoji and noto)")
    if not i2i and (args.query_style or args.gallery_style or args.gallery != "items"):
        raise UserError("--query-style, --gallery-style and --gallery apply to --task i2i only")
    run = open_run(args.run_dir)
    if i2i and args.data == "emoji":
        dataset = load("emoji", styles=tuple(dict.fromkeys((args.query_style, args.gallery_style))))
    else:
        dataset = resolve_dataset(args.data)
    dataset = dataset.split(args.split)
    if dataset.num_items == 0:
        raise UserError(f"data set {dataset.name!r} has no {args.split} split to evaluate; choose another --split")
    if i2i:
        metrics = evaluate(run, dataset, task="i2i", query_style=args.query_style, gallery_style=args.gallery_style,
                           gallery=args.gallery, centroid_method=args.centroid_method)
        label = f"{args.query_style}->{args.gallery_style}_{args.gallery}"
        print(f"{run.config.preset} ({args.split}, {label}): " + ", ".join(
            f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in metrics.items()))
        default_out = Path(args.run_dir) / f"metrics_{args.split}_i2i_{label.replace('->', '_to_')}.json"
    else:
        metrics = evaluate(run.model, dataset, tokenizer=run.tokenizer, max_length=run.config.max_length,
                           protocol=args.protocol)
        print(format_metrics({f"{run.config.preset} ({args.split}, {args.protocol})": metrics}))
        default_out = Path(args.run_dir) / f"metrics_{args.split}_{args.protocol}.json"
    out = out or default_out
    text = json.dumps({k: float(v) for k, v in metrics.items()}, indent=2) + "\n"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(f"metrics written to {out}")


def cmd_quickstart(args):
    from tfemde.quickstart import quickstart

    quickstart(out=args.out, epochs=args.epochs, fast=args.fast)


def cmd_build_emoji(args):
    if args.style == "twemoji":
        from tfemde.data.build_twemoji import build_twemoji

        if args.langs:
            raise UserError("--langs: the Twemoji style file holds images only (captions come from the Noto set)")
        stats = build_twemoji(args.out, svg_dir=args.svg_dir, size=args.size)
        print(f"wrote {args.out}: {stats['images']} Twemoji images, {stats['missing']} emoji without a Twemoji "
              f"file, {stats['bytes'] / 2**20:.1f} MiB")
        return 0
    from tfemde.data.build_emoji import main as build_main

    if args.svg_dir:
        raise UserError("--svg-dir applies to --style twemoji only")
    argv = [args.out, "--size", str(args.size)] + (["--langs", ",".join(args.langs)] if args.langs else [])
    return build_main(argv)


def cmd_export(args):
    from tfemde.export import ExportError, export_run
    from tfemde.serving.manifest import Manifest, read_manifest

    try:
        out = export_run(args.run_dir, args.out, opset=args.opset, quantize=args.quantize)
    except ExportError as error:
        raise UserError(f"export failed its checks, nothing written: {error}") from error
    spec = Manifest.from_dict(read_manifest(out), repr(str(out)))
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in spec.raw["verification"]["max_abs_diff"].items())
    print(f"exported {spec.preset} to {out} (K={spec.set_size}, D={spec.dim}); max |ONNX/SavedModel - TF|: {diffs}")
    if spec.int8_files:
        cosines = spec.raw["verification"]["int8"]
        print("int8 graphs, smallest cosine to TF: " + ", ".join(
            f"{name} {cosines[name]['min_cosine']:.4f}" for name in spec.int8_files.values())
            + (f" (and {', '.join(spec.int8_vnni_files.values())}: the same integers, run on CPUs with VNNI)"
               if spec.int8_vnni_files else ""))
