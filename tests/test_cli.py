"""The run folder and the `tfemde` command: train, evaluate, resume after a kill, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tfemde.cli import main
from tfemde.training.runs import open_run, train

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
           "black": (10, 10, 10), "white": (250, 250, 250)}
SHAPES = ("square", "circle", "stripe")
TINY = ["embed_dim=16", "word_dim=8", "num_slots=2", "set_depth=1", "sketch_depth=2", "sketch_bits=2",
        "cnn_filters=[4,8]", "image_size=16"]
TINY_KWARGS = dict(embed_dim=16, word_dim=8, num_slots=2, set_depth=1, sketch_depth=2, sketch_bits=2,
                   cnn_filters=(4, 8), image_size=16)


def draw(colour, shape, size=16):
    image = np.full((size, size, 3), 128, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    region = {"square": (abs(yy - 8) < 5) & (abs(xx - 8) < 5),
              "circle": (yy - 8) ** 2 + (xx - 8) ** 2 < 30,
              "stripe": abs(yy - xx) < 3}[shape]
    image[region] = COLOURS[colour]
    return image


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
    """36 image files with 2 captions each, in train/val/test, as a JSONL file."""
    folder = tmp_path_factory.mktemp("tiny")
    lines = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        for copy in range(2):
            name = f"{colour}_{shape}_{copy}.png"
            Image.fromarray(draw(colour, shape)).save(folder / name)
            split = ("train", "train", "val", "test")[(i + copy) % 4]
            lines.append(json.dumps({"image": name, "captions": [f"a {colour} {shape}", f"{shape} in {colour}"],
                                     "split": split}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_writes_a_complete_run_and_evaluate_reads_it(jsonl_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "--data", str(jsonl_data), "--preset", "dive_temde", "--epochs", "2", "--batch-size", "16",
                 "--vocab-size", "40", "--out", str(run_dir), "--set", *TINY])
    assert code == 0
    for name in ("config.json", "tokenizer.model", "best.keras", "history.csv", "metrics.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "backup").exists()
    history = (run_dir / "history.csv").read_text().splitlines()
    assert history[0].split(",")[0] == "epoch" and len(history) == 3 and "val_rsum" in history[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["rsum"] <= 600 and metrics["split"] == "test"
    assert json.loads((run_dir / "config.json").read_text())["embed_dim"] == 16
    assert "rsum" in capsys.readouterr().out

    code = main(["evaluate", str(run_dir), "--data", str(jsonl_data), "--split", "test"])
    assert code == 0
    evaluated = json.loads((run_dir / "metrics_test_full.json").read_text())
    # the best checkpoint evaluated again gives the numbers train recorded
    assert evaluated["rsum"] == pytest.approx(metrics["rsum"], abs=1e-6)


def test_caption_parts_train_on_every_listed_part_of_a_training_caption(tmp_path, monkeypatch):
    import keras

    folder = tmp_path / "keywords"
    folder.mkdir()
    lines = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        Image.fromarray(draw(colour, shape)).save(folder / f"{i}.png")
        split = ("train", "train", "val", "test")[i % 4]
        lines.append(json.dumps({"image": f"{i}.png", "captions": [f"{colour}, {shape}, {colour} {shape}"],
                                 "split": split}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    train_items = sum(("train", "train", "val", "test")[i % 4] == "train" for i in range(len(lines)))

    class CountBatches(keras.callbacks.Callback):
        batches = 0

        def on_train_batch_end(self, batch, logs=None):
            CountBatches.batches += 1

    run = train(data=str(folder / "pairs.jsonl"), preset="vse", epochs=1, batch_size=4, vocab_size=30,
                out=tmp_path / "run", verbose=0, caption_parts=True, callbacks=[CountBatches()], **TINY_KWARGS)
    captions = 4 * train_items  # each training caption and its three parts
    assert CountBatches.batches == captions // 4, "one epoch of batches of 4 over the captions and their parts"
    assert json.loads((run.path / "run.json").read_text())["caption_parts"] is True

    seen = {}
    monkeypatch.setattr("tfemde.training.runs.train", lambda **kwargs: seen.update(kwargs))
    main(["train", "--data", str(folder / "pairs.jsonl"), "--out", str(tmp_path / "cli"), "--caption-parts"])
    assert seen["caption_parts"] is True


class KillAfter:
    """Raises in the middle of a run, as a kill would."""

    def __init__(self, epochs):
        import keras

        class _Kill(keras.callbacks.Callback):
            def on_epoch_end(inner, epoch, logs=None):
                if epoch + 1 == epochs:
                    raise KeyboardInterrupt

        self.callback = _Kill()


def test_a_killed_run_resumes_where_it_stopped(jsonl_data, tmp_path):
    out = tmp_path / "run"
    kwargs = dict(data=str(jsonl_data), preset="vse", epochs=3, batch_size=16, vocab_size=40, out=out, verbose=0,
                  **TINY_KWARGS)
    with pytest.raises(KeyboardInterrupt):
        train(callbacks=[KillAfter(2).callback], **kwargs)
    assert (out / "backup").is_dir()
    tokenizer_before = (out / "tokenizer.model").read_bytes()
    run = train(**kwargs)
    epochs = [int(line.split(",")[0]) for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [0, 1, 2], "the resumed run repeats or skips epochs"
    assert (out / "tokenizer.model").read_bytes() == tokenizer_before
    assert not (out / "backup").exists() and run.metrics["epochs"] == 3


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_never_mixes_with_the_run_already_in_its_folder(jsonl_data, tmp_path, capsys):
    """A finished run, an interrupted run with other settings, and a folder of the user's: refused with one line and
    left byte for byte; --overwrite replaces a run's files (never a user's) and the new folder holds only the new
    run: its config, tokenizer and best.keras agree and metrics.json scores that model."""
    out = tmp_path / "run"
    base = ["train", "--data", str(jsonl_data), "--epochs", "1", "--batch-size", "16", "--out", str(out)]
    assert main(base + ["--preset", "vse", "--vocab-size", "40", "--set", *TINY]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    other = base + ["--preset", "dive", "--vocab-size", "24", "--set", *TINY]
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished run" in err[0] and "--overwrite" in err[0], err
    assert _snapshot(out) == before

    assert main(other + ["--overwrite"]) == 0
    run = open_run(out)
    assert run.config.preset == "dive" and run.model.config.preset == "dive"
    assert run.tokenizer.vocab_size == run.config.vocab_size == run.model.config.vocab_size
    assert (out / "tokenizer.model").read_bytes() != before["tokenizer.model"]
    assert json.loads((out / "metrics.json").read_text())["preset"] == "dive"
    assert json.loads((out / "run.json").read_text())["preset"] == "dive"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))  # as `open` makes files, not mkstemp's 0600

    interrupted = tmp_path / "interrupted"
    kwargs = dict(data=str(jsonl_data), preset="vse", epochs=2, batch_size=16, vocab_size=40, out=interrupted,
                  verbose=0, **TINY_KWARGS)
    with pytest.raises(KeyboardInterrupt):
        train(callbacks=[KillAfter(1).callback], **kwargs)
    before = _snapshot(interrupted)
    with pytest.raises(ValueError, match="interrupted run with other settings .*differ in seed"):
        train(**{**kwargs, "seed": 1})
    assert _snapshot(interrupted) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "config.json").write_text("{}")
    for flags in ([], ["--overwrite"]):
        assert main(["train", "--data", str(jsonl_data), "--out", str(mine), *flags]) == 2
        err = capsys.readouterr().err
        assert "is not a tfemde run folder" in err and str(mine) in err, err
        assert _snapshot(mine) == {"config.json": b"{}", "notes.txt": b"mine"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tfemde.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent/data.jsonl", "--out", "x"], "/nonexistent/data.jsonl"),
    (["train", "--preset", "nope", "--out", "x"], "unknown preset 'nope'"),
    (["evaluate", "/nonexistent/run"], "run folder not found: /nonexistent/run"),
])
def test_user_errors_are_one_line_not_a_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("tfemde")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_non_utf8_captions_are_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"image": "a.png", "captions": ["caf\xe9"], "split": "train"}\n')
    result = run_cli("train", "--data", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(path) in result.stderr


def test_open_run_names_the_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model is missing"):
        open_run(tmp_path)


def test_train_with_its_defaults_learns_a_new_small_data_set(jsonl_data, tmp_path):
    """A user's first run on their own small data, default loss and learning rates (tiny sizes for speed): the
    training split is retrieved far better than by chance (the mean RSUM of random scores on the same split)."""
    from tfemde.evaluation import evaluate, retrieval_metrics
    from tfemde.training.runs import resolve_dataset

    run = train(data=str(jsonl_data), preset="dive_temde", epochs=40, batch_size=8, vocab_size=40, out=tmp_path / "r",
                verbose=0, validate_every=20, **TINY_KWARGS)
    split = resolve_dataset(str(jsonl_data)).split("train")
    learned = evaluate(run, split, progress=False)["rsum"]
    rng = np.random.default_rng(0)
    chance = np.mean([retrieval_metrics(rng.random((split.num_items, split.num_captions)), split.caption_item,
                                        split.item_group)["rsum"] for _ in range(20)])
    assert learned > chance + 150, (learned, chance)


@pytest.mark.parametrize("argv, augmented", [([], False), (["--augment"], True)], ids=["default", "--augment"])
def test_train_augments_only_when_asked(argv, augmented, jsonl_data, tmp_path, monkeypatch):
    """The default trains on the pairs as they are; --augment uses the papers' augmentations (the pipeline's own
    defaults). What was chosen is part of the run's identity."""
    import tfemde.data

    seen, original = [], tfemde.data.train_dataset

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(tfemde.data, "train_dataset", recording)
    out = tmp_path / "run"
    assert main(["train", "--data", str(jsonl_data), "--preset", "vse", "--epochs", "1", "--batch-size", "16",
                 "--vocab-size", "40", "--out", str(out), "--set", *TINY, *argv]) == 0
    (kwargs,) = seen
    if augmented:
        assert not {"caption_augment", "image_augment", "region_drop"} & set(kwargs)
    else:
        assert (kwargs["caption_augment"], kwargs["image_augment"], kwargs["region_drop"]) == (0.0, False, 0.0)
    assert json.loads((out / "run.json").read_text())["augment"] is augmented


def test_curves_of_a_run_validated_every_few_epochs(tmp_path, monkeypatch):
    """CSVLogger writes NA where an epoch has no validation; the curves plot the validated epochs at their place."""
    import matplotlib.axes

    from tfemde.training.plots import plot_history

    (tmp_path / "history.csv").write_text("epoch,loss,val_rsum\n0,3.0,NA\n1,2.0,55.5\n2,1.5,NA\n3,1.2,80.0\n")
    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or original(self, x, y, *a, **k))
    assert plot_history(tmp_path / "history.csv", tmp_path / "curves.png").stat().st_size > 1000
    assert drawn == [([1, 2, 3, 4], [3.0, 2.0, 1.5, 1.2]), ([2, 4], [55.5, 80.0])]


@pytest.fixture(scope="module")
def finished_run(jsonl_data, tmp_path_factory):
    """A finished one-epoch vse run on the tiny data, and the same data without its test split."""
    root = tmp_path_factory.mktemp("finished")
    run = train(data=str(jsonl_data), preset="vse", epochs=1, batch_size=16, vocab_size=40, out=root / "run",
                verbose=0, **TINY_KWARGS)
    lines = [line for line in jsonl_data.read_text().splitlines() if json.loads(line)["split"] != "test"]
    no_test = jsonl_data.parent / "no_test.jsonl"
    no_test.write_text("\n".join(lines) + "\n")
    return run.path, no_test


def _broken_copy(run_dir, tmp_path, name, content):
    copy = tmp_path / f"broken_{name.replace('.', '_')}"
    copy.mkdir()
    for path in run_dir.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    (copy / name).write_bytes(content(copy / name))
    return copy


BAD_INPUTS = [
    # (name, argv with {data} {no_test} {run} {out} {file} {folder} {broken_config} {broken_model}, expected text)
    ("cnn_filters", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "cnn_filters=5"],
     "cnn_filters must be a non-empty list of positive integers"),
    ("set vocab_size", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "vocab_size=5"],
     "--set vocab_size=...: vocab_size is an option of train, not a config field; use --vocab-size"),
    ("epochs 0", ["train", "--data", "{data}", "--out", "{out}", "--epochs", "0"], "epochs must be an integer >= 1; got 0"),
    ("epochs -1", ["train", "--data", "{data}", "--out", "{out}", "--epochs", "-1"], "epochs must be an integer >= 1; got -1"),
    ("batch 0", ["train", "--data", "{data}", "--out", "{out}", "--batch-size", "0"], "batch_size must be an integer >= 1"),
    ("bucket width -1", ["train", "--data", "{data}", "--out", "{out}", "--bucket-width", "-1"],
     "bucket_width must be an integer >= 0; got -1"),
    ("num_slots", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "num_slots=1.5"],
     "num_slots must be an integer >= 1; got 1.5"),
    ("embed_dim", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "embed_dim=16.7"],
     "embed_dim must be an integer >= 1; got 16.7"),
    ("sketch_weight", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "sketch_weight=x"],
     "sketch_weight must be a number >= 0; got 'x'"),
    ("alpha", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "alpha=-3"], "alpha must be a number > 0; got -3"),
    ("margin", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "margin=NaN"], "margin must be a number >= 0; got nan"),
    ("backbone", ["train", "--data", "{data}", "--out", "{out}", "--set", *TINY, "image_input=backbone", "backbone=NoSuchNet"],
     "backbone must be a keras.applications model name"),
    ("train out is a file", ["train", "--data", "{data}", "--out", "{file}"], "exists and is not a folder"),
    ("quickstart epochs 0", ["quickstart", "--out", "{out}", "--epochs", "0"], "epochs must be an integer >= 1"),
    ("quickstart out is a file", ["quickstart", "--out", "{file}", "--fast"], "exists and is not a folder"),
    ("evaluate missing split", ["evaluate", "{run}", "--data", "{no_test}", "--split", "test"], "has no test split"),
    ("evaluate out is a folder", ["evaluate", "{run}", "--data", "{data}", "--out", "{folder}"], "is a folder"),
    ("corrupt config.json", ["evaluate", "{broken_config}", "--data", "{data}"], "config.json is not valid JSON"),
    ("truncated best.keras", ["evaluate", "{broken_model}", "--data", "{data}"], "best.keras cannot be read"),
    ("embed out is a folder", ["embed", "{run}", "--texts", "{file}", "--out", "{folder}"], "is a folder"),
    ("index out is a folder", ["index", "{run}", "--data", "{data}", "--out", "{folder}"], "is a folder"),
    ("index float16 without ann", ["index", "{run}", "--data", "{data}", "--out", "{out}", "--float16"],
     "--key, --neighbours, --refine and --float16 are options of an approximate index"),
    ("index key without ann", ["index", "{run}", "--data", "{data}", "--out", "{out}", "--key", "elements+sketch"],
     "--key, --neighbours, --refine and --float16 are options of an approximate index"),
    ("index refine without ann", ["index", "{run}", "--data", "{data}", "--out", "{out}", "--refine", "2"],
     "--key, --neighbours, --refine and --float16 are options of an approximate index"),
    ("index refine 0", ["index", "{run}", "--data", "{data}", "--out", "{folder}/new.ann", "--ann", "flat",
                        "--refine", "0"], "--refine must be an int >= 1; got 0"),
]


@pytest.mark.parametrize("name, argv, expected", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, argv, expected, jsonl_data, finished_run, tmp_path,
                                                            capsys):
    run_dir, no_test = finished_run
    (tmp_path / "a_file.txt").write_text("a caption\n")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_folder" / "mine.txt").write_text("mine")
    places = dict(data=jsonl_data, no_test=no_test, run=run_dir, out=tmp_path / "new_run",
                  file=tmp_path / "a_file.txt", folder=tmp_path / "a_folder",
                  broken_config=_broken_copy(run_dir, tmp_path, "config.json", lambda p: b'{"embed_dim": 1'),
                  broken_model=_broken_copy(run_dir, tmp_path, "best.keras", lambda p: p.read_bytes()[:200]))
    before, run_before = _snapshot(tmp_path), _snapshot(run_dir)
    capsys.readouterr()
    assert main([arg.format(**places) for arg in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tfemde ") and expected in err[0], err
    assert _snapshot(tmp_path) == before and _snapshot(run_dir) == run_before
    assert not (tmp_path / "new_run").exists()
