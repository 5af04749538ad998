"""Training runs: one folder with everything a run produces, and the functions that make and reopen it.

A run folder holds `config.json`, `tokenizer.model`, `best.keras` (best validation RSUM), `history.csv`,
`curves.png` and `metrics.json` (test metrics of the best checkpoint); `backup/` lets a killed run resume.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import shutil
import time
from pathlib import Path

import numpy as np

from tfemde.files import TMP_PREFIX as _TMP_PREFIX
from tfemde.evaluation.metrics import format_metrics, mean_std  # noqa: F401 - part of this module's API
from tfemde.files import atomic_write
from tfemde.models.config import DEFAULT_PRESET
from tfemde.models.run_folder import Run, open_run, resolve_dataset  # noqa: F401 - part of this module's API

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_VOCAB_SIZE = 2000
DEFAULT_MAX_LENGTH = 24
# Captions grouped into batches of about the same length and padded to a multiple of this: on the emoji captions the
# text tower runs 12.8 steps on average instead of 24 (dive_temde at the quickstart size: 282 s instead of 315 s for
# the same validation RSUM, 291 against 304, one seed).
DEFAULT_BUCKET_WIDTH = 8
DEFAULT_BALANCE_GROUPS = False
# The papers' augmentations (caption token masking, image crop and flip, region drop) slow fitting more than they help
# generalising in a short run from scratch: dive_temde at the quickstart size, 6 epochs, validation RSUM 314.6 without
# them (and without dropout) against 302.2 with them, training-split RSUM 570 against 369 (README.md, one seed).
DEFAULT_AUGMENT = False


def config_for(dataset, tokenizer, preset_name, max_length, **overrides):
    """The preset's config with the data-facing sizes taken from the data set and the tokenizer."""
    from tfemde.models import preset

    sizes = dict(vocab_size=tokenizer.vocab_size, max_length=max_length)
    if dataset.kind == "regions":
        sizes.update(image_input="regions", num_regions=int(dataset.regions.shape[1]),
                     region_dim=int(dataset.regions.shape[2]))
    elif dataset.kind == "images":
        sizes.update(image_size=int(dataset.images.shape[1]))
    if overrides.get("image_input") == "backbone" and dataset.kind == "regions":
        raise ValueError("image_input='backbone' needs images; this data set holds region features")
    return preset(preset_name, **{**sizes, **overrides})


RUN_FILES = ("config.json", "tokenizer.model", "best.keras", "best.json", "history.csv", "curves.png", "metrics.json",
             "run.json", "backup")


def data_digest(dataset) -> str:
    """A sha256 identifying a `Dataset`: captions, their items, splits, groups and the items.

    Pixels and file paths are hashed whole; region features (often a memory map of many GB) by their shape, the rows
    used and the first 64 rows only, so a resume check stays fast.
    """
    import hashlib

    digest = hashlib.sha256()
    for caption in dataset.captions:
        digest.update(caption.encode("utf-8", "surrogatepass") + b"\0")
    for array in (dataset.caption_item, dataset.item_split, dataset.item_group):
        digest.update(np.ascontiguousarray(array).tobytes())
    if dataset.images is not None:
        digest.update(np.ascontiguousarray(dataset.images).tobytes())
    elif dataset.image_paths is not None:
        digest.update("\0".join(map(str, dataset.image_paths)).encode("utf-8", "surrogatepass"))
    else:
        rows = np.arange(len(dataset.regions)) if dataset.region_rows is None else dataset.region_rows
        digest.update(np.ascontiguousarray(rows).tobytes())
        digest.update(np.ascontiguousarray(dataset.regions[: min(len(dataset.regions), 64)]).tobytes())
        digest.update(repr(tuple(dataset.regions.shape)).encode())
    return digest.hexdigest()


def _out_state(out: Path, identity: dict, overwrite: bool) -> str:
    """What a run with `identity` does with `out`: `"new"`, `"resume"` or `"replace"` (raises when it may not).

    An empty or new folder is `"new"`. A folder holding an interrupted run (`backup/`) with the same `run.json`
    resumes. Any other run folder is refused unless `overwrite` (`"replace"`: its run files are removed once the
    inputs are known to be valid). A folder holding anything but run files is always refused: nothing of the user's
    is deleted or mixed with a run.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return "new"
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.startswith(_TMP_PREFIX))
    if foreign:
        raise ValueError(f"out {str(out)!r} is not empty and is not a tfemde run folder (it holds {foreign[0]!r}); "
                         "choose another folder")
    record_path = out / "run.json"
    try:
        previous = json.loads(record_path.read_text()) if record_path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        previous = None
    if (out / "backup").is_dir() and previous == identity and (out / "tokenizer.model").is_file():
        return "resume"
    if not overwrite:
        if (out / "backup").is_dir() and isinstance(previous, dict):
            differ = sorted(k for k in set(identity) | set(previous) if identity.get(k) != previous.get(k))
            what = f"an interrupted run with other settings (they differ in {', '.join(differ)})"
        elif (out / "backup").is_dir():
            what = "an interrupted run whose settings are not recorded"
        else:
            what = "a finished run"
        raise ValueError(f"out {str(out)!r} already holds {what}; pass overwrite=True (--overwrite) to replace it, "
                         "or choose another folder")
    return "replace"


def _worker_state(out: Path, identity: dict) -> str:
    """What a worker that is not the chief does: `"resume"` where the chief will (it sees the chief's interrupted
    run with the same identity in `out`), else `"new"`; it never writes or removes anything in `out`."""
    try:
        previous = json.loads((out / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "new"
    resumable = (out / "backup").is_dir() and (out / "tokenizer.model").is_file()
    return "resume" if resumable and previous == identity else "new"


def _remove_run_files(out: Path):
    for path in [out / name for name in RUN_FILES] + list(out.glob(_TMP_PREFIX + "*")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def train(data="emoji", preset=DEFAULT_PRESET, epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE, out="runs/run",
          vocab_size=DEFAULT_VOCAB_SIZE,
          max_length=DEFAULT_MAX_LENGTH, seed=0, verbose=1, validate_every=1, callbacks=(), overwrite=False,
          bucket_width=DEFAULT_BUCKET_WIDTH, balance_groups=DEFAULT_BALANCE_GROUPS, augment=DEFAULT_AUGMENT,
          instances_per_group=0, caption_parts=False, strategy=None, **overrides) -> Run | None:
    """Train a dual encoder with `model.fit` and write a complete run folder.

    Args:
        data: `"emoji"`, a path `tfemde.data.load` understands, or a `Dataset`.
        preset: a preset name (`tfemde.models.PRESETS`).
        epochs, batch_size: the fit budget; `batch_size` is the global batch, split evenly over the replicas of
            `strategy`, and the loss of each replica scores against all of it.
        out: the run folder (created). An interrupted run in it with the same settings and data resumes from
            `backup/`; any other run there is refused unless `overwrite`, and so is a folder holding other files.
        vocab_size: the SentencePiece vocabulary to train on the training captions.
        max_length: captions are cut/padded to this many tokens.
        seed: seeds Keras, the pipeline's shuffling and augmentation.
        verbose: 0 silent, 1 progress bars and a line per epoch.
        validate_every: validation R@K/RSUM every this many epochs.
        callbacks: more Keras callbacks for `fit`.
        overwrite: replace a run already in `out` (its run files only) instead of refusing.
        bucket_width: batch captions of about the same length and pad each batch to a multiple of this
            (`tfemde.data.train_dataset`); 0 pads every caption to `max_length`.
        balance_groups: draw each epoch's pairs so that every group (concept) is seen equally often, instead of
            every caption once (`tfemde.data.train_dataset`).
        augment: the papers' training augmentations, `tfemde.data.train_dataset`'s defaults (caption tokens masked,
            replaced or dropped with p = 0.2; images randomly cropped and flipped; regions dropped with p = 0.2).
            False trains on the pairs as they are.
        instances_per_group: `M > 0` samples each batch as `batch_size / M` groups times `M` of their images
            (`tfemde.data.train_dataset`), what the centroid loss (`--set centroid_weight=...`) learns from.
        caption_parts: also train on every part of a training caption that lists parts separated by commas, as a
            caption of its own (`Dataset.with_caption_parts`; the emoji data's CLDR keyword lists).
        strategy: `None`/`"none"` (one device), `"mirrored"` (every GPU of this machine), `"multi_worker"` (the
            cluster in `TF_CONFIG`), or a `tf.distribute.Strategy` (`tfemde.training.distribute.make_strategy`).
            The model is built under its scope. Under a cluster only the chief writes `out`, validates and keeps
            the best checkpoint; to resume a killed run every worker must see `out`.
        **overrides: any `DualEncoderConfig` field. `mixed_precision` defaults to True where TensorFlow sees a GPU.

    Returns:
        the opened `Run`, with test metrics of the best checkpoint in `run.metrics`; None on a worker that is not
        the chief.
    """
    import keras

    from tfemde.training.callbacks import BestCheckpoint, RetrievalValidation, WorkerBackupAndRestore
    from tfemde.training.distribute import gpus_present, is_chief, make_strategy, num_replicas
    from tfemde.data import NO_AUGMENTATION, eval_dataset, train_dataset
    from tfemde.evaluation import evaluate
    from tfemde.models import build_dual_encoder
    from tfemde.training.plots import plot_history
    from tfemde.text import Tokenizer

    strategy = make_strategy(strategy)  # first: a MultiWorkerMirroredStrategy must come before other TensorFlow work
    chief, replicas = is_chief(strategy), num_replicas(strategy)
    out = Path(out)
    for name, value, minimum in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("vocab_size", vocab_size, 4),
                                 ("max_length", max_length, 1), ("seed", seed, 0),
                                 ("validate_every", validate_every, 1), ("bucket_width", bucket_width, 0),
                                 ("instances_per_group", instances_per_group, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    for name, value in (("overwrite", overwrite), ("balance_groups", balance_groups), ("augment", augment),
                        ("caption_parts", caption_parts)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2; got {verbose!r}")
    if batch_size % replicas:
        raise ValueError(f"batch_size must be a multiple of the number of replicas ({replicas}), so that every replica "
                         f"gets the same share of the global batch; got {batch_size}")
    dataset = resolve_dataset(data)
    splits = {name: dataset.split(name) for name in ("train", "val", "test")}
    if caption_parts:
        splits["train"] = splits["train"].with_caption_parts()
    for name in ("train", "val"):
        if splits[name].num_items == 0:
            raise ValueError(f"data set {dataset.name!r} has no {name} items; train needs train and val splits")
    if "mixed_precision" not in overrides and gpus_present():
        overrides["mixed_precision"] = True  # float16 on tensor cores, the loss in float32; never on a CPU
        if verbose and chief:
            print("GPU found: training in mixed precision (mixed_float16 layers, float32 loss); "
                  "--set mixed_precision=false to turn it off")
    identity = {"preset": preset, "batch_size": batch_size, "vocab_size": vocab_size, "max_length": max_length,
                "bucket_width": bucket_width, "balance_groups": balance_groups, "augment": augment, "seed": seed,
                **({"instances_per_group": instances_per_group} if instances_per_group else {}),
                **({"caption_parts": True} if caption_parts else {}),
                "overrides": json.loads(json.dumps(overrides, sort_keys=True, default=repr)),
                "data": data_digest(dataset)}
    state = _out_state(out, identity, overwrite) if chief else _worker_state(out, identity)
    tokenizer_path = out / "tokenizer.model"
    if state == "resume":
        tokenizer = Tokenizer.load(tokenizer_path)  # keep the ids the backup was trained with
    else:
        tokenizer = Tokenizer.train(splits["train"].captions, vocab_size=vocab_size)
    config = config_for(dataset, tokenizer, preset, max_length, **overrides)
    # Everything that can fail on the inputs (the model, the pipelines) is built before a file is written.
    with (strategy.scope() if strategy is not None else contextlib.nullcontext()):
        keras.utils.set_random_seed(seed)
        model = build_dual_encoder(config)
        model.compile()
    if verbose and replicas > 1:
        print(f"{replicas} replicas: global batch {batch_size}, {batch_size // replicas} per replica"
              + ("" if chief else " (a worker: the chief writes the run folder)"))
    image_size = config.image_size if dataset.kind == "image_files" else None
    train_data = train_dataset(splits["train"], tokenizer, batch_size=min(batch_size, splits["train"].num_captions),
                               max_length=max_length, seed=seed, image_size=image_size, bucket_width=bucket_width,
                               balance_groups=balance_groups, instances_per_group=instances_per_group,
                               **({} if augment else NO_AUGMENTATION))
    val_data = eval_dataset(splits["val"], tokenizer, batch_size=256, max_length=max_length, image_size=image_size)

    backup = WorkerBackupAndRestore(str(out / "backup"), chief=chief, delete_checkpoint=True)
    if not chief:
        model.fit(train_data, epochs=epochs, callbacks=[backup, *callbacks], verbose=0)
        return None
    if state == "replace":
        _remove_run_files(out)
    out.mkdir(parents=True, exist_ok=True)
    if state != "resume":
        atomic_write(out / "run.json", lambda tmp: Path(tmp).write_text(json.dumps(identity, indent=2) + "\n"))
        atomic_write(tokenizer_path, tokenizer.save)
    atomic_write(out / "config.json", config.save)
    callbacks = [
        RetrievalValidation(val_data, every=validate_every, verbose=verbose),
        BestCheckpoint(out / "best.keras", verbose=verbose),
        backup,
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=(out / "backup").is_dir()),
        *callbacks,
    ]
    started = time.time()
    model.fit(train_data, epochs=epochs, callbacks=callbacks, verbose=verbose)
    train_seconds = time.time() - started
    plot_history(out / "history.csv", out / "curves.png", title=f"{config.preset} on {dataset.name}")

    run = open_run(out)
    test_split = "test" if splits["test"].num_items else "val"
    metrics = evaluate(run.model, splits[test_split], tokenizer=tokenizer, max_length=max_length, progress=verbose > 0)
    record = {**{k: float(v) for k, v in metrics.items()}, "split": test_split, "preset": config.preset,
              "epochs": epochs, "batch_size": batch_size, "train_seconds": round(train_seconds, 1)}
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return run
