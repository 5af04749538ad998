"""The `tfemde` command: quickstart, train, evaluate, export, embed, index, search, providers, data build-emoji.

The parser and `main` live here; the commands in `training_commands` (they need the `train` extra) and
`serving_commands` (TensorFlow-free).

Errors a user can fix (a bad path, an unknown preset, unreadable data) print one line, not a traceback
(set TFEMDE_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

from tfemde import TRAIN_ONLY_MODULES, train_extra_hint  # noqa: E402
from tfemde.cli.errors import UserError  # noqa: E402
from tfemde.cli.serving_commands import cmd_embed, cmd_index, cmd_providers, cmd_search  # noqa: E402
from tfemde.cli.training_commands import (cmd_build_emoji, cmd_evaluate, cmd_export, cmd_quickstart,  # noqa: E402
                                          cmd_train)
from tfemde.data.dataset import SPLITS  # noqa: E402
from tfemde.export.convert import DEFAULT_OPSET, SUPPORTED_OPSETS  # noqa: E402
from tfemde.models.config import DEFAULT_PRESET  # noqa: E402
from tfemde.training.distribute import DISTRIBUTE_CHOICES  # noqa: E402
from tfemde.training.runs import (DEFAULT_AUGMENT, DEFAULT_BALANCE_GROUPS, DEFAULT_BATCH_SIZE,  # noqa: E402
                                  DEFAULT_BUCKET_WIDTH, DEFAULT_EPOCHS, DEFAULT_VOCAB_SIZE)


def parser() -> argparse.ArgumentParser:
    # Choices come from the library (both modules are TensorFlow-free, so the parser stays quick to build).
    from tfemde.evaluation import PROTOCOLS
    from tfemde.serving.ann import DEFAULT_NEIGHBOURS, FACTORY_KINDS, KEYS
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
    tr.add_argument("--caption-parts", action="store_true",
                    help="also train on each comma-separated part of a training caption as a caption of its own "
                         "(keyword lists such as the emoji data's)")
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
    ix.add_argument("--key", choices=KEYS, default="elements",
                    help="with --ann: FAISS's keys: every set element, or every element with its item's sketch "
                         "appended ('elements+sketch', for models with a sketch: finds items that the sketch tells "
                         "apart, e.g. near-duplicates), one sketch or one MUVERA encoding per item")
    ix.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                    help="with --ann: FAISS neighbours per query element")
    ix.add_argument("--refine", type=int, default=1,
                    help="with --ann: FAISS returns REFINE x neighbours keys, the best neighbours by exact inner "
                         "products with the stored sets go on (for --ann ivfpq on galleries of near-duplicates)")
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

