"""Keras callbacks for retrieval training: validation R@K/RSUM in the logs, the best checkpoint by RSUM, and backups
that a cluster of workers shares."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras

from tfemde.files import atomic_write
from tfemde.models.dual_encoder import save_model


class RetrievalValidation(keras.callbacks.Callback):
    """Evaluates retrieval on validation data after each epoch and adds `val_<metric>` entries to the logs.

    The logs then carry `val_rsum`, `val_i2t_r1`, ..., so `CSVLogger`, `BestCheckpoint`, `EarlyStopping` and the
    progress bar all see them.

    Args:
        eval_data: the validation split as `tfemde.data.eval_dataset(...)` returns it.
        every: evaluate every `every` epochs (and always after the last one).
        protocol: `"full"` or `"coco1k"`.
        verbose: print one line of metrics per evaluation.
    """

    def __init__(self, eval_data, every=1, protocol="full", verbose=1):
        super().__init__()
        self.eval_data = eval_data
        self.every = max(int(every), 1)
        self.protocol = protocol
        self.verbose = verbose

    def on_epoch_end(self, epoch, logs=None):
        last = self.params.get("epochs") == epoch + 1
        if (epoch + 1) % self.every and not last:
            return
        from tfemde.evaluation import evaluate_encoded, metrics_line

        metrics = evaluate_encoded(self.model, self.eval_data, protocol=self.protocol, progress=False)
        if logs is not None:
            logs.update({f"val_{name}": float(value) for name, value in metrics.items()})
        if self.verbose:
            print(f" - val {metrics_line(metrics)}")


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model as `.keras` whenever `monitor` improves; each save goes to a temporary file first.

    The best value is kept beside the model (`best.json`), so a run resumed after a kill (`BackupAndRestore`)
    only replaces the checkpoint when it beats the best value from before the kill.

    Args:
        path: the `.keras` file to keep the best model in.
        monitor: the log entry to watch (default `val_rsum`, higher is better).
        mode: `"max"` or `"min"`.
    """

    def __init__(self, path, monitor="val_rsum", mode="max", verbose=1):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}")
        self.path = Path(path)
        self.monitor = monitor
        self.mode = mode
        self.verbose = verbose
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch = None

    @property
    def record_path(self) -> Path:
        return self.path.with_suffix(".json")

    def on_train_begin(self, logs=None):
        if self.path.is_file() and self.record_path.is_file():
            try:
                record = json.loads(self.record_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"checkpoint record {str(self.record_path)!r} is corrupt ({error}); remove it and "
                                 f"{self.path.name} to start afresh") from None
            if isinstance(record, dict) and record.get("monitor") == self.monitor:
                self.best, self.best_epoch = record["best"], record["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better:
            self.best, self.best_epoch = float(value), epoch + 1
            save_model(self.model, self.path)
            record = json.dumps({"monitor": self.monitor, "best": self.best, "epoch": self.best_epoch})
            atomic_write(self.record_path, lambda tmp: Path(tmp).write_text(record))
            if self.verbose:
                print(f" - {self.monitor} improved to {value:.2f}: saved {self.path}")


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` for a cluster: the chief backs up as usual; another worker restores from the chief's
    backup (the weights of every worker are the same after each step) and never writes or deletes it.

    Args:
        backup_dir: the chief's backup folder.
        chief: whether this process is the chief.
        **kwargs: `keras.callbacks.BackupAndRestore`'s (`save_freq`, ...).
    """

    def __init__(self, backup_dir, chief=True, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.chief = chief

    def _save_model(self):
        if self.chief:
            super()._save_model()

    def on_train_end(self, logs=None):
        if self.chief:
            super().on_train_end(logs)
