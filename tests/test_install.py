"""The base install is the TensorFlow-free serving runtime (setup.py: `install_requires` = requirements-serve.txt).

This tree's wheel goes into a fresh virtual environment without any extra: it must hold no TensorFlow or Keras,
embed with an export exactly as this (training) install does, and stop a training command with one line that
names the `train` extra.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_run

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red heart", "cat on a rocket", ""]


def _run(args, cwd, timeout=900):
    # Nothing of this process's environment may leak into the fresh one (a PYTHONPATH would show it this tree).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def serving_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    code, out, err = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           tmp, ROOT], cwd=tmp)
    assert code == 0, err[-3000:]
    (wheel,) = tmp.glob("tfemde-*.whl")
    code, out, err = _run([sys.executable, "-m", "venv", tmp / "venv"], cwd=tmp)
    assert code == 0, err[-3000:]
    bin_dir = tmp / "venv" / "bin"
    code, out, err = _run([bin_dir / "pip", "install", "-q", "--disable-pip-version-check", wheel], cwd=tmp)
    assert code == 0, err[-3000:]
    from tfemde.export import export_run

    model, tokenizer = tiny_run(tmp)
    return {"bin": bin_dir, "export": export_run(model, tmp / "export", tokenizer=tokenizer), "tmp": tmp}


def test_the_base_install_has_no_tensorflow_and_embeds_as_the_training_install_does(serving_install, tmp_path):
    from tfemde.serving import Encoder

    bin_dir = serving_install["bin"]
    code, out, err = _run([bin_dir / "python", "-c", "import importlib.util, json; print(json.dumps("
                           "{m: importlib.util.find_spec(m) is not None for m in ('tensorflow', 'keras', 'tf2onnx', "
                           "'onnxruntime', 'sentencepiece')}))"], cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert json.loads(out) == {"tensorflow": False, "keras": False, "tf2onnx": False, "onnxruntime": True,
                               "sentencepiece": True}
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS[:2]) + "\n", encoding="utf-8")
    code, out, err = _run([bin_dir / "tfemde", "embed", serving_install["export"], "--texts", tmp_path / "texts.txt",
                           "--out", tmp_path / "texts.npz"], cwd=tmp_path)
    assert code == 0, err[-3000:]
    want = Encoder.load(serving_install["export"]).encode_texts(TEXTS[:2])
    with np.load(tmp_path / "texts.npz") as got:
        assert got["ids"].tolist() == TEXTS[:2]
        np.testing.assert_allclose(got["sets"], want.sets, atol=1e-6)
        np.testing.assert_allclose(got["sketches"], want.sketches, atol=1e-6)


def test_training_in_the_base_install_names_the_train_extra(serving_install, tmp_path):
    bin_dir = serving_install["bin"]
    code, out, err = _run([bin_dir / "tfemde", "train", "--out", tmp_path / "run"], cwd=tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert 'pip install "tfemde[train]"' in lines[0] and "is not installed" in lines[0], lines
    assert not (tmp_path / "run").exists()
    code, out, err = _run([bin_dir / "python", "-c", "import tfemde; tfemde.build_dual_encoder"], cwd=tmp_path)
    assert code == 1 and 'pip install "tfemde[train]"' in err.strip().splitlines()[-1], err[-3000:]
