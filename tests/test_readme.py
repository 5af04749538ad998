"""README.md cannot drift from the code: every command and code block in it runs here, with small settings.

Each block is found by its fence language and position; the small settings are textual substitutions that must
match the README (a substitution that no longer matches fails the test instead of silently running the big job).
"""

import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfemde.cli import parser as build_parser
from tfemde.data import load

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
TINY_MODEL = "embed_dim=32, word_dim=16, num_slots=2, set_depth=1, sketch_depth=4, sketch_bits=4"


def fenced_blocks(text):
    """`[(language, body, marker)]` of every fenced block; `marker` is an HTML comment on the line before, if any."""
    blocks = []
    for match in re.finditer(r"(?:<!-- ([\w-]+) -->\n)?```(\w*)\n(.*?)```", text, flags=re.S):
        blocks.append((match.group(2), match.group(3), match.group(1)))
    return blocks


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))


def block(language, index=0, marker=None):
    found = [body for lang, body, mark in BLOCKS if lang == language and (marker is None or mark == marker)]
    return found[index]


def small(text, substitutions):
    for big, tiny in substitutions:
        assert big in text, f"README no longer contains {big!r}; update tests/test_readme.py with it"
        text = text.replace(big, tiny)
    return text


def run(args, cwd, timeout=900, **kwargs):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{args!r} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_block_is_one_this_file_runs():
    kinds = [lang for lang, _, _ in BLOCKS]
    assert sorted(kinds) == sorted(["bash", "bash", "python", "python", "bash", "bash", "json", "jsonl", "text",
                                    "text"]), kinds


def test_multi_worker_example_is_one_cluster_of_commands_the_parser_accepts():
    """The TF_CONFIG example cannot run here (two hosts); tests/test_distribute.py runs the same command on two
    localhost workers. Here: every command parses, and the workers name one cluster, each its own index."""
    import shlex

    from tfemde.training.distribute import _tf_config

    lines = block("bash", marker="multi-worker-example").replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    clusters, indexes = [], []
    for words in commands:
        assert words[0].startswith("TF_CONFIG=") and words[1] == "tfemde"
        os.environ["TF_CONFIG"] = words[0][len("TF_CONFIG="):]
        try:
            config = _tf_config()
        finally:
            del os.environ["TF_CONFIG"]
        clusters.append(config["cluster"])
        indexes.append(config["task"]["index"])
        args = build_parser().parse_args(words[2:])
        assert args.distribute == "multi_worker" and args.batch_size == 128
    assert clusters[0] == clusters[1] and sorted(indexes) == list(range(len(clusters[0]["worker"])))


def test_main_command_installs_the_package_with_its_data_and_console_script(tmp_path):
    command = block("bash", marker="main-command").strip()
    assert command == 'python3 -m venv .venv && .venv/bin/pip install ".[train]" && .venv/bin/tfemde quickstart'
    # `pip install ".[train]"` builds a wheel: it must carry the built-in data set and the `tfemde` console script.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], cwd=tmp_path)
    (wheel,) = tmp_path.glob("tfemde-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "tfemde/data/builtin/emoji.npz" in names and "tfemde/data/builtin/NOTICE" in names
    assert "tfemde/data/builtin/emoji_twemoji.npz" in names
    assert re.search(r"^tfemde\s*=\s*tfemde\.cli:main$", entry_points, flags=re.M)
    # ... and that script runs the quickstart (tests/test_quickstart.py runs the job itself, in fast mode).
    assert "--fast" in run([str(BIN / "tfemde"), "quickstart", "--help"], cwd=tmp_path)


def test_test_command_is_the_one_ci_runs(tmp_path):
    command = block("bash", marker="test-command").strip()
    assert command.endswith('pip install -e ".[test]" && .venv/bin/python -m pytest -q tests')
    awk = re.search(r"cmd=\$\(awk '(.*?)' README\.md\)", (ROOT / ".ci" / "run").read_text()).group(1)
    extracted = run(["awk", awk, str(README)], cwd=tmp_path).strip()
    assert extracted == command


def test_python_example_trains_evaluates_exports_and_serves(tmp_path):
    code = small(block("python"), [("epochs=6", "epochs=1"), ("embed_dim=256, word_dim=128, set_depth=2, set_head_dim=64", TINY_MODEL)])
    out = run([sys.executable, "-c", code], cwd=tmp_path)
    metrics = json.loads(re.search(r"^\{.*'rsum'.*\}$", out, flags=re.M).group(0).replace("'", '"'))
    assert 0 <= metrics["rsum"] <= 600 and metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
    assert (tmp_path / "exports" / "emoji" / "manifest.json").is_file()
    names = set(load("emoji").item_names)
    rows = re.findall(r"\[([^\[\]]+)\]", out[out.rindex("[["):])
    assert len(rows) == 2
    for row in rows:
        hits = [ast.literal_eval(f"'{hit}'") for hit in re.findall(r"'([^']*)'", row)]  # repr escapes ZWJ etc.
        assert len(hits) == 5 and set(hits) <= names, row
    # the approximate index's example, on the export just written
    out = run([sys.executable, "-c", block("python", marker="ann-example")], cwd=tmp_path)
    assert out.split()[-4:] == [str(load("emoji").num_items), "Flat", "(2,", "10)"], out
    assert (tmp_path / "gallery.ann" / "manifest.json").is_file()


def test_command_line_block_runs_and_writes_what_the_readme_says(tmp_path):
    script = small(block("bash", index=2), [("--epochs 6", "--epochs 1 --vocab-size 300"),
                                            ("embed_dim=256 word_dim=128 set_depth=2 set_head_dim=64", TINY_MODEL.replace(",", ""))])
    lines = [line for line in script.splitlines() if line.strip()]
    outputs = [run(["bash", "-euo", "pipefail", "-c", line], cwd=tmp_path) for line in lines]
    run_dir = tmp_path / "runs" / "emoji"
    for name in ("config.json", "tokenizer.model", "best.keras", "history.csv", "curves.png", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert "rsum" in outputs[1]
    export_dir = tmp_path / "exports" / "emoji"
    listed = [name.rstrip("/") for name in block("text", index=1).split()]
    assert sorted(p.name for p in export_dir.iterdir()) == sorted(listed)
    assert (tmp_path / "emoji.index").is_file()
    assert "red heart" in outputs[4] and "rocket" in outputs[4]
    embedded = np.load(tmp_path / "queries.npz")
    assert embedded["sets"].shape[:2] == (2, 2)


def test_command_table_lists_only_options_the_parser_accepts():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    rows = re.findall(r"^\| `tfemde ([^`]+)` \|", README.read_text(encoding="utf-8"), flags=re.M)
    assert {row.split()[0] for row in rows} == set(commands)
    for row in rows:
        words = row.split()
        sub = commands[words[0]]
        if words[0] == "data":
            sub = sub._subparsers._group_actions[0].choices[words[1]]
        accepted = {s for action in sub._actions for s in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", row):
            assert flag in accepted, f"README lists `tfemde {words[0]} ... {flag}`, which the parser does not accept"


def _write_pictures(folder, names):
    emoji = load("emoji")
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(emoji.images[i]).save(path)


def test_karpathy_json_example_loads(tmp_path):
    text = block("json")
    spec = json.loads(text)
    _write_pictures(tmp_path, [os.path.join(im["filepath"], im["filename"]) for im in spec["images"]])
    (tmp_path / "dataset_example.json").write_text(text)
    data = load(tmp_path / "dataset_example.json")
    assert data.num_items == 3 and data.num_captions == 4
    assert sorted(data.item_split) == ["test", "train", "val"]
    assert [c for c, item in zip(data.captions, data.caption_item) if item == 1] == ["a dog", "a puppy"]


def test_jsonl_example_loads(tmp_path):
    text = block("jsonl")
    _write_pictures(tmp_path, [json.loads(line)["image"] for line in text.splitlines()])
    (tmp_path / "pairs.jsonl").write_text(text)
    data = load(tmp_path / "pairs.jsonl")
    assert data.num_items == 3 and data.num_captions == 4
    assert list(data.split("val").captions) == ["a dog", "a puppy"]
    assert len(set(data.item_group)) == 3


def test_precomp_folder_example_loads(tmp_path):
    rng = np.random.default_rng(0)
    for name in block("text", index=0).split():
        split = name.split("_")[0]
        n = {"train": 4, "dev": 2, "test": 2}[split]
        if name.endswith("_ims.npy"):
            np.save(tmp_path / name, rng.normal(size=(n, 3, 8)).astype("float32"))
        else:
            (tmp_path / name).write_text("".join(f"caption {split} {i}\n" for i in range(5 * n)))
    data = load(tmp_path)
    assert data.kind == "regions" and data.num_items == 8 and data.num_captions == 40
    assert data.split("val").num_items == 2


def test_quality_table_shows_the_committed_benchmark_results():
    results = json.loads((ROOT / "benchmarks" / "results" / "quality.json").read_text())["results"]
    table = README.read_text(encoding="utf-8").split("<!-- quality-table -->")[1].split("\n\n")[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)`[^|]*\|(.*)$", table, flags=re.M)}
    assert set(rows) == set(results)
    for name, runs in results.items():
        cells = [c.strip() for c in rows[name].split("|")][-4:-1]
        for cell, key in zip(cells, ("i2t_r1", "t2i_r1", "rsum")):
            values = np.array([r[key] for r in runs])
            assert cell == f"{values.mean():.1f} ± {values.std():.1f}", (name, key, cell)


def test_styles_table_shows_the_committed_benchmark_results():
    """README's image-to-image table is benchmarks/styles.py's table of benchmarks/results/styles.json."""
    results = json.loads((ROOT / "benchmarks" / "results" / "styles.json").read_text())
    table = README.read_text(encoding="utf-8").split("<!-- styles-table -->")[1].split("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    expected = []
    for arm, records in results["arms"].items():
        for gallery in records[0]["i2i"]:
            cells = [arm, gallery]
            for key in ("map", "r1"):
                values = np.array([r["i2i"][gallery][key] for r in records])
                cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
            for style in ("noto", "twemoji"):
                values = np.array([r[f"t2i_rsum_{style}"] for r in records])
                cells.append(f"{values.mean():.1f} ± {values.std():.1f}" if gallery == "full" else "")
            expected.append(cells)
    assert rows == expected
