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

from tfemde import TRAIN_ONLY_MODULES, train_extra_hint  # noqa: E402
from tfemde.files import atomic_write  # noqa: E402 - after the log level, before anything imports TensorFlow
from tfemde.data.dataset import SPLITS  # noqa: E402
from tfemde.export.convert import DEFAULT_OPSET, SUPPORTED_OPSETS  # noqa: E402
from tfemde.models.config import DEFAULT_PRESET  # noqa: E402
from tfemde.training.distribute import DISTRIBUTE_CHOICES  # noqa: E402
from tfemde.training.runs import (DEFAULT_AUGMENT, DEFAULT_BALANCE_GROUPS, DEFAULT_BATCH_SIZE,  # noqa: E402
                                  DEFAULT_BUCKET_WIDTH, DEFAULT_EPOCHS, DEFAULT_VOCAB_SIZE)


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


# `train`'s own options: a `--set` of one of these would reach `train` twice.
TRAIN_OPTIONS = {"data": "--data", "preset": "--preset", "epochs": "--epochs", "batch_size": "--batch-size",
                 "vocab_size": "--vocab-size", "seed": "--seed", "out": "--out", "overwrite": "--overwrite",
                 "bucket_width": "--bucket-width", "balance_groups": "--balance-groups", "augment": "--augment",
                 "strategy": "--distribute", "instances_per_group": "--instances-per-group"}
TRAIN_ONLY = ("verbose", "validate_every", "callbacks")


def _out_file(path, option="--out"):
    """`path` as a `Path` for a file to write; one line when it names a folder (or sits under a file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give the path of the file to write")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise UserError(f"{option} {path}: a parent of it exists and is not a folder")
    return path


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
                instances_per_group=args.instances_per_group, **overrides)
    if run is None:
        print("worker done: the chief wrote the run folder")
        return
    print(format_metrics({args.preset: run.metrics}))
    print(f"run written to {run.path}")


def cmd_evaluate(args):
    from tfemde.data import load
    from tfemde.evaluation import evaluate, format_metrics
    from tfemde.models.run_folder import open_run, resolve_dataset

    out = _out_file(args.out) if args.out else None
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
            f"{name} {cosines[name]['min_cosine']:.4f}" for name in spec.int8_files.values()))


def _serving_encoder(args):
    from tfemde.serving import Encoder

    return Encoder.load(args.export_dir, text_route=args.text_route, batch_size=args.batch_size,
                        precision=args.precision)


def _read_lines(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"texts file not found: {path}")
    texts = path.read_text(encoding="utf-8").splitlines()
    if not texts:
        raise UserError(f"texts file {path} is empty; it needs one text per line")
    return texts


def _encode_image_folder(encoder, folder, strict, command, chunk=1024):
    """`(ids, Embeddings)` of the readable images in `folder`, decoded and encoded `chunk` at a time; the others are
    reported on one line and skipped, or with `strict` the first one is the error."""
    import numpy as np

    from tfemde.serving import Embeddings
    from tfemde.serving.images import list_images, load_image

    if encoder.image_size is None:
        raise UserError(f"this export's model takes region features, not images; {command} --images needs an image "
                        "model")
    paths = list_images(folder)
    ids, parts, skipped = [], [], []
    for start in range(0, len(paths), chunk):
        pixels = []
        for path in paths[start:start + chunk]:
            try:
                pixels.append(load_image(path, encoder.image_size))
                ids.append(os.path.basename(path))
            except ValueError as error:
                if strict:
                    raise
                skipped.append(str(error))
        if pixels:
            parts.append(encoder.encode_images(np.stack(pixels)))
    if skipped:
        print(f"tfemde {command}: warning: skipped {len(skipped)} of {len(paths)} images (pass --strict to stop "
              f"instead): {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    if not ids:
        raise UserError(f"no readable image in {folder}")
    return ids, Embeddings.concat(parts)


def cmd_embed(args):
    import numpy as np

    out = _out_file(args.out)
    encoder = _serving_encoder(args)
    if args.texts:
        ids = _read_lines(args.texts)
        embeddings = encoder.encode_texts(ids)
    else:
        ids, embeddings = _encode_image_folder(encoder, args.images, args.strict, "embed")
    arrays = {"ids": np.asarray(ids, dtype=str), "sets": embeddings.sets}
    if embeddings.sketches is not None:
        arrays.update(sketches=embeddings.sketches, sketch_depth=np.int64(embeddings.sketch_depth))
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to another suffix
            np.savez(f, **arrays)

    atomic_write(out, write)
    sketch = f", sketches [{len(embeddings)}, {embeddings.sketch_dim}]" if embeddings.sketches is not None else ""
    print(f"embedded {len(embeddings)} {'texts' if args.texts else 'images'}: sets {list(embeddings.sets.shape)}"
          f"{sketch} -> {out}")


def _dataset_items(name, split):
    """`(ids, kind, items)` of a data set for `tfemde index --data`: pixels, file paths or region features."""
    import numpy as np

    from tfemde.data import load

    dataset = load(name)
    if split != "all":
        dataset = dataset.split(split)
    if dataset.num_items == 0:
        raise UserError(f"data set {dataset.name!r} has no items in split {split!r}")
    names = dataset.item_names
    if names is not None and len(np.unique(names)) == len(names):
        ids = [str(n) for n in names]
    else:
        ids = [f"{i}" if names is None else f"{i}:{names[i]}" for i in range(dataset.num_items)]
    if dataset.kind == "images":
        return ids, "images", dataset.images
    if dataset.kind == "image_files":
        return ids, "paths", [str(p) for p in dataset.image_paths]
    return ids, "regions", dataset


def _ann_module():
    """`tfemde.serving.ann`, whose indexes need faiss-cpu (the `ann` extra); one line when it is missing."""
    from tfemde.serving import ann

    try:
        ann._faiss()
    except ImportError as error:
        raise UserError(str(error)) from None
    return ann


def _load_index(path):
    """A `SetIndex` file or an `AnnSetIndex` folder, as `tfemde index` wrote it."""
    from tfemde.serving import load_index

    if Path(path).is_dir():
        _ann_module()
    return load_index(path)


def cmd_index(args):
    import numpy as np

    from tfemde.serving import Embeddings, SetIndex

    if args.ann:
        out = Path(args.out)
        ann = _ann_module()
        ann.check_replaceable(out)
    else:
        from tfemde.serving.ann import DEFAULT_NEIGHBOURS

        if args.float16 or args.neighbours != DEFAULT_NEIGHBOURS:
            raise UserError("--neighbours and --float16 are options of an approximate index; add --ann auto (or "
                            "flat, hnsw, ivfpq)")
        out = _out_file(args.out)
    encoder = _serving_encoder(args)
    if args.ann:  # built before the encoding, which is the long part, so that a bad argument stops at once
        index = ann.AnnSetIndex(**encoder.similarity_kwargs, factory=args.ann, neighbours=args.neighbours,
                                store_dtype="float16" if args.float16 else "float32",
                                export_digest=encoder.export_digest)
    else:
        index = SetIndex(**encoder.similarity_kwargs, export_digest=encoder.export_digest)
    if args.images:
        ids, embeddings = _encode_image_folder(encoder, args.images, args.strict, "index")
    else:
        ids, kind, items = _dataset_items(args.data, args.split)
        if kind == "regions":
            step = 1024  # region features are read from their memory map a chunk at a time
            embeddings = Embeddings.concat([
                encoder.encode_regions(items.region_features(np.arange(i, min(i + step, len(ids)))))
                for i in range(0, len(ids), step)])
        else:
            embeddings = encoder.encode_images(items)
    index.add(embeddings, ids=ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    index.save(out)
    what = f", FAISS {index.factory} over {index.num_keys} keys" if args.ann else ""
    print(f"indexed {len(index)} items (alpha={index.alpha}, sketch_weight={index.sketch_weight}{what}) -> {out}")


def cmd_search(args):
    if args.k < 1:
        raise UserError(f"-k must be >= 1; got {args.k}")
    index = _load_index(args.index)
    encoder = _serving_encoder(args)
    if index.export_digest not in (None, encoder.export_digest) and not args.allow_other_export:
        raise UserError(f"index {args.index} was built with another export than {args.export_dir} (export digest "
                        f"{index.export_digest[:12]}…, this export's {encoder.export_digest[:12]}…): its vectors come "
                        "from another model; rebuild it with `tfemde index`, or pass --allow-other-export")
    if (index.alpha, index.sketch_weight) != (encoder.alpha, encoder.sketch_weight):
        print(f"tfemde search: warning: the index scores with alpha={index.alpha}, sketch_weight="
              f"{index.sketch_weight}; the export's model uses alpha={encoder.alpha}, sketch_weight="
              f"{encoder.sketch_weight}", file=sys.stderr)
    ids, scores = index.search(encoder.encode_texts(args.query), k=args.k)
    for query, row_ids, row_scores in zip(args.query, ids, scores):
        print(f"{query!r}:")
        for rank, (item, score) in enumerate(zip(row_ids, row_scores), 1):
            print(f"  {rank:>3}. {score:8.4f}  {item}")


def cmd_providers(args):
    """The onnxruntime execution providers here, the ones serving would choose, and why CUDA is missing."""
    import onnxruntime as ort

    from tfemde.serving.providers import choose_providers, cuda_problem, installed_onnxruntime_wheels

    available = ort.get_available_providers()
    wheels = installed_onnxruntime_wheels()
    print("onnxruntime wheels: " + (", ".join(f"{name} {version}" for name, version in wheels.items()) or "none"))
    print("available providers: " + ", ".join(available))
    print("serving uses: " + ", ".join(choose_providers(available)))
    problem = cuda_problem(available, wheels)
    if problem:
        print(f"tfemde providers: warning: {problem}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    # Choices come from the library (both modules are TensorFlow-free, so the parser stays quick to build).
    from tfemde.evaluation import PROTOCOLS
    from tfemde.serving.ann import DEFAULT_NEIGHBOURS, FACTORY_KINDS
    from tfemde.serving.encoder import PRECISIONS, TEXT_ROUTES

    top = argparse.ArgumentParser(prog="tfemde", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="train the default model and the VSE++ baseline on the emoji data")
    quick.add_argument("--out", default="runs/quickstart", help="folder for both runs and the pictures")
    quick.add_argument("--epochs", type=int, default=None, help="epochs per model (default: the quickstart budget)")
    quick.add_argument("--fast", action="store_true", help="a tiny run that only checks that everything works")
    quick.set_defaults(func=cmd_quickstart)

    tr = sub.add_parser("train", help="train a dual encoder with model.fit and write a run folder")
    tr.add_argument("--data", default="emoji", help="'emoji', a Karpathy JSON, a precomp folder or a JSONL file")
    tr.add_argument("--preset", default=DEFAULT_PRESET)
    tr.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    tr.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                    help=f"captions per batch (default {DEFAULT_BATCH_SIZE}: in a short run more, smaller steps learn "
                         "faster)")
    tr.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--bucket-width", type=int, default=DEFAULT_BUCKET_WIDTH,
                    help="batch captions of about the same length, padded to a multiple of this many tokens "
                         f"(default {DEFAULT_BUCKET_WIDTH}; 0 pads every caption to max_length)")
    tr.add_argument("--balance-groups", action=argparse.BooleanOptionalAction, default=DEFAULT_BALANCE_GROUPS,
                    help="draw each epoch's pairs so that every group (concept) is seen equally often instead of "
                         "every caption once")
    tr.add_argument("--augment", action=argparse.BooleanOptionalAction, default=DEFAULT_AUGMENT,
                    help="the papers' augmentations: caption tokens masked/replaced/dropped, images cropped and "
                         "flipped, regions dropped (default off: in a short run from scratch they slow fitting more "
                         "than they help)")
    tr.add_argument("--out", required=True, help="the run folder to write (an interrupted run there with the same "
                    "settings resumes; any other run there is refused unless --overwrite)")
    tr.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    tr.add_argument("--styles", help="--data emoji: the art styles to train on, e.g. noto,twemoji (default noto)")
    tr.add_argument("--instances-per-group", type=int, default=0, metavar="M",
                    help="batches of --batch-size/M groups x M of their images (for --set centroid_weight=...)")
    tr.add_argument("--distribute", choices=DISTRIBUTE_CHOICES, default="none",
                    help="none: one device; mirrored: every GPU of this machine; multi_worker: the cluster in "
                         "TF_CONFIG (run the same command on every worker; the chief writes --out). --batch-size is "
                         "the global batch")
    tr.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config fields, e.g. embed_dim=256")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="R@K, RSUM, median and mean rank of a run on a split")
    ev.add_argument("run_dir")
    ev.add_argument("--data", default="emoji")
    ev.add_argument("--split", default="test", choices=SPLITS)
    ev.add_argument("--protocol", default="full", choices=tuple(PROTOCOLS))
    ev.add_argument("--out", help="the JSON to write (default RUN_DIR/metrics_SPLIT_PROTOCOL.json)")
    ev.add_argument("--task", default="image_text", choices=("image_text", "i2i"),
                    help="image_text: images <-> captions; i2i: images of one style search those of another")
    ev.add_argument("--query-style", help="--task i2i: the queries' style (emoji: twemoji or noto)")
    ev.add_argument("--gallery-style", help="--task i2i: the gallery's style")
    ev.add_argument("--gallery", default="items", choices=("items", "centroids"),
                    help="--task i2i: every gallery image, or one centroid per group")
    ev.add_argument("--centroid-method", default="slot_mean", choices=("slot_mean", "kmeans", "union"),
                    help="--gallery centroids: how a set head's group becomes one entry")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("export", help="export a run's encoders to ONNX + SavedModel, checked against TensorFlow")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help="the export folder to write (an earlier export there is replaced)")
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                    help=f"ONNX opset, {SUPPORTED_OPSETS[0]}-{SUPPORTED_OPSETS[-1]} (default {DEFAULT_OPSET})")
    ex.add_argument("--quantize", action="store_true",
                    help="also write int8 image/text graphs (faster on CPUs, checked by cosine to TF)")
    ex.set_defaults(func=cmd_export)

    def serving_options(p):
        p.add_argument("export_dir", help="a folder written by `tfemde export`")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--text-route", default=TEXT_ROUTES[0], choices=TEXT_ROUTES,
                       help="tokenize with the sentencepiece library + text.onnx, or run text_e2e.onnx on strings")
        p.add_argument("--precision", default=PRECISIONS[0], choices=PRECISIONS,
                       help="int8: the quantized graphs of an export made with --quantize")

    em = sub.add_parser("embed", help="embed texts or images with an export (onnxruntime, no TensorFlow)")
    serving_options(em)
    what = em.add_mutually_exclusive_group(required=True)
    what.add_argument("--texts", help="a UTF-8 file with one text per line")
    what.add_argument("--images", help="a folder of image files")
    em.add_argument("--out", required=True, help="the .npz to write (ids, sets, sketches, sketch_depth)")
    em.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    em.set_defaults(func=cmd_embed)

    ix = sub.add_parser("index", help="build a SetIndex file of images with an export")
    serving_options(ix)
    source = ix.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of image files (ids are the file names)")
    source.add_argument("--data", help="a data set: 'emoji' or a path tfemde.data.load reads")
    ix.add_argument("--split", default="all", choices=("all", *SPLITS), help="with --data")
    ix.add_argument("--out", required=True, help="the index file to write (with --ann: the index folder)")
    ix.add_argument("--ann", choices=FACTORY_KINDS, default=None,
                    help="an approximate index for large galleries (needs faiss-cpu, the `ann` extra): FAISS "
                         "candidates re-ranked exactly; 'auto' chooses by size (see tfemde.serving.ann)")
    ix.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                    help="with --ann: FAISS neighbours per query element")
    ix.add_argument("--float16", action="store_true", help="with --ann: store the sets in float16 (half the bytes)")
    ix.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser("search", help="search an index with text queries")
    serving_options(se)
    se.add_argument("--index", required=True, help="an index file (or --ann folder) written by `tfemde index`")
    se.add_argument("--query", required=True, action="append", help="a text query (repeat for several)")
    se.add_argument("-k", type=int, default=5, help="results per query")
    se.add_argument("--allow-other-export", action="store_true",
                    help="search an index built with another export (e.g. a deliberately re-exported model)")
    se.set_defaults(func=cmd_search)

    pv = sub.add_parser("providers", help="the onnxruntime execution providers serving uses here (CUDA or CPU), and "
                        "what to do when the GPU wheel offers no CUDA")
    pv.set_defaults(func=cmd_providers)

    data = sub.add_parser("data", help="data-set tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build-emoji", help="rebuild the emoji data set from Debian's font and CLDR, or its "
                                "Twemoji style from npm's @twemoji/svg")
    build.add_argument("out")
    build.add_argument("--size", type=int, default=64)
    build.add_argument("--langs", nargs="*")
    build.add_argument("--style", choices=("noto", "twemoji"), default="noto",
                       help="noto: the main file (images and captions); twemoji: the images-only style file")
    build.add_argument("--svg-dir", help="--style twemoji: a folder of the package's SVG files (default: npm pack)")
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
    except ModuleNotFoundError as error:
        if os.environ.get("TFEMDE_DEBUG") or error.name not in TRAIN_ONLY_MODULES:
            raise
        print(f"tfemde {args.command}: error: {train_extra_hint(error.name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tfemde {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
