"""tf.distribute: two replicas train as one device on the global batch; a cluster of two localhost workers trains,
resumes after a kill, and leaves a run folder (the chief's) that evaluates and exports.

TensorFlow fixes its devices and its cluster when a process starts, so the strategies run in child processes
(`tests/distributed_run.py`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from test_cli import jsonl_data  # noqa: F401 - the fixture: 36 image files with two captions each
from tfemde.cli import main
from tfemde.training.distribute import DISTRIBUTE_CHOICES, is_chief, make_strategy, num_replicas

SCRIPT = Path(__file__).with_name("distributed_run.py")
ROOT = SCRIPT.parents[1]
TIMEOUT = 420


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def mirrored_report():
    result = subprocess.run([sys.executable, str(SCRIPT), "mirrored"], capture_output=True, text=True, env=_env(),
                            timeout=TIMEOUT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[0][len("REPORT "):])


@pytest.mark.parametrize("case", ["dive_temde_triplet", "dive_info_nce_regions", "vse_triplet_sum", "temde_info_nce"])
def test_two_replicas_train_as_one_device_on_the_global_batch(mirrored_report, case):
    """MirroredStrategy over two logical CPUs, dropout off, plain SGD: each step's loss is the one-device loss of the
    global batch (so every replica scored against the other's captions and ids), and after three steps the weights
    are the one-device weights. Tolerance: 1e-4 of a loss and 1e-5 of a weight, where the steps moved weights by
    0.2-1.2 (float32 summation order differs between one and two replicas)."""
    assert mirrored_report["replicas"] == 2
    report = mirrored_report[case]
    np.testing.assert_allclose(report["mirrored_loss"], report["one_device_loss"], rtol=1e-5, atol=1e-4)
    assert report["moved"] > 0.05, "the steps did not move the weights: the comparison would prove nothing"
    assert report["weight_difference"] < 1e-5, report


def test_strategy_names_and_the_chief():
    assert DISTRIBUTE_CHOICES == ("none", "mirrored", "multi_worker")
    assert make_strategy(None) is None and make_strategy("none") is None and num_replicas(None) == 1
    with pytest.raises(ValueError, match="distribute must be one of none, mirrored, multi_worker.*'horovod'"):
        make_strategy("horovod")
    previous = os.environ.pop("TF_CONFIG", None)
    try:
        with pytest.raises(ValueError, match="TF_CONFIG.*got no TF_CONFIG"):
            make_strategy("multi_worker")
        os.environ["TF_CONFIG"] = "{not json"
        with pytest.raises(ValueError, match="TF_CONFIG must be JSON"):
            make_strategy("multi_worker")
    finally:
        os.environ.pop("TF_CONFIG", None)
        if previous is not None:
            os.environ["TF_CONFIG"] = previous

    import tensorflow as tf

    def member(cluster, task_type, task_id):
        spec = tf.train.ClusterSpec(cluster)
        return SimpleNamespace(cluster_resolver=tf.distribute.cluster_resolver.SimpleClusterResolver(
            spec, task_type=task_type, task_id=task_id))

    workers = {"worker": ["localhost:1", "localhost:2"]}
    assert is_chief(None) and is_chief(member(workers, "worker", 0)) and not is_chief(member(workers, "worker", 1))
    with_chief = {"chief": ["localhost:0"], **workers}
    assert is_chief(member(with_chief, "chief", 0)) and not is_chief(member(with_chief, "worker", 0))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_cluster(args_of):
    """Two worker processes on localhost; `args_of(index)` is the command line of worker `index`."""
    hosts = [f"localhost:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(args_of(index), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=_env(TF_CONFIG=config), cwd=str(ROOT)))
    return processes


def _finish(processes, timeout=TIMEOUT):
    outputs = []
    deadline = time.time() + timeout
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        outputs.append((process.returncode, out, err))
    return outputs


def test_two_workers_train_and_the_chiefs_run_folder_evaluates_and_exports(jsonl_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tfemde.cli", "train", "--distribute", "multi_worker", "--data",
               str(jsonl_data), "--preset", "dive_temde", "--epochs", "2", "--batch-size", "8", "--vocab-size", "40",
               "--out", str(out), "--set", "embed_dim=16", "word_dim=8", "num_slots=2", "set_depth=1",
               "sketch_depth=2", "sketch_bits=2", "cnn_filters=[4,8]", "image_size=16"]
    results = _finish(_start_cluster(lambda index: command))
    for code, stdout, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "2 replicas: global batch 8, 4 per replica" in results[0][1] and "rsum" in results[0][1]
    assert "worker done: the chief wrote the run folder" in results[1][1]
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "val_rsum" in history[0]
    assert not (out / "backup").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.json", "best.keras", "config.json", "curves.png", "history.csv", "metrics.json", "run.json",
         "tokenizer.model"]), "a worker wrote into the chief's run folder, or the chief left a file half-written"

    assert main(["evaluate", str(out), "--data", str(jsonl_data), "--split", "test"]) == 0
    recorded = json.loads((out / "metrics.json").read_text())
    evaluated = json.loads((out / "metrics_test_full.json").read_text())
    assert evaluated["rsum"] == pytest.approx(recorded["rsum"], abs=1e-6)
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "image.onnx").is_file() and (tmp_path / "export" / "text.onnx").is_file()


def test_a_cluster_with_a_killed_worker_resumes_from_the_chiefs_backup(jsonl_data, tmp_path):  # noqa: F811
    """Worker 1 dies (os._exit, no clean-up) after the first batch of epoch 2 of 3; the chief is then killed as a
    cluster manager would, and both are started again: both resume at epoch 2 from the chief's backup, and the run
    folder holds each epoch once."""
    out = tmp_path / "run"

    def command(kill_at=None):
        return lambda index: [sys.executable, str(SCRIPT), "worker", str(out), str(jsonl_data), "3"] + (
            [] if kill_at is None else [str(kill_at)])

    processes = _start_cluster(command(kill_at=1))
    killed = processes[1]
    try:
        killed.wait(timeout=TIMEOUT)
    finally:
        processes[0].send_signal(signal.SIGKILL)
        _, err = killed.communicate()
        processes[0].communicate()
    assert killed.returncode == 9, err[-3000:]
    metadata = json.loads((out / "backup" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1
    assert [int(line.split(",")[0]) for line in (out / "history.csv").read_text().splitlines()[1:]] == [0]

    results = _finish(_start_cluster(command()))
    for code, stdout, stderr in results:
        assert code == 0, stderr[-3000:]
        assert "FIRST_EPOCH 1" in stdout, stdout
    assert "CHIEF" in results[0][1] and "WORKER" in results[1][1]
    epochs = [int(line.split(",")[0]) for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [0, 1, 2], "the resumed cluster repeats or skips epochs"
    assert not (out / "backup").exists() and json.loads((out / "metrics.json").read_text())["epochs"] == 3


def test_training_defaults_to_mixed_precision_where_there_is_a_gpu(jsonl_data, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Where TensorFlow sees a GPU (faked here: this machine has none) a run trains mixed_float16 layers unless the
    user says otherwise; on a CPU it stays float32."""
    from test_cli import TINY_KWARGS

    from tfemde.training import distribute
    from tfemde.training.runs import train

    kwargs = dict(data=str(jsonl_data), preset="vse", epochs=1, batch_size=16, vocab_size=40, verbose=1,
                  **TINY_KWARGS)
    monkeypatch.setattr(distribute, "gpus_present", lambda: True)
    run = train(out=tmp_path / "gpu", **kwargs)
    assert "training in mixed precision" in capsys.readouterr().out
    assert run.config.mixed_precision and np.isfinite(run.metrics["rsum"])
    assert run.model.get_layer("image_fc").compute_dtype == "float16"
    assert not train(out=tmp_path / "asked", mixed_precision=False, **kwargs).config.mixed_precision
    monkeypatch.setattr(distribute, "gpus_present", lambda: False)
    assert not train(out=tmp_path / "cpu", **kwargs).config.mixed_precision
