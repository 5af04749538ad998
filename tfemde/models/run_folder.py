"""Reading a run folder (`Run`, `open_run`) and naming a data set (`resolve_dataset`).

The lowest layer of the training side: `tfemde.training.runs` writes run folders, `tfemde.evaluation` and `tfemde.export`
read them, and both import this module, not each other.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional


@dataclasses.dataclass
class Run:
    """An opened run folder: its config, tokenizer and (loaded on first use) best model."""

    path: Path
    config: object
    tokenizer: object
    _model: object = None

    @property
    def model(self):
        if self._model is None:
            from tfemde.models import load_model

            self._model = load_model(self.path / "best.keras")
        return self._model

    @property
    def metrics(self) -> Optional[dict]:
        path = self.path / "metrics.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"metrics file {path} is not valid JSON ({error})") from None


def open_run(path) -> Run:
    """Reopen a run folder written by `train`; a clear error names what is missing."""
    from tfemde.models import DualEncoderConfig
    from tfemde.text import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    for name in ("config.json", "tokenizer.model", "best.keras"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete run folder: {name} is missing")
    return Run(path=path, config=DualEncoderConfig.load(path / "config.json"),
               tokenizer=Tokenizer.load(path / "tokenizer.model"))


def resolve_dataset(data, strict=False):
    """A `Dataset` as is, or `tfemde.data.load(data)` for a name or path."""
    from tfemde.data import Dataset, load

    return data if isinstance(data, Dataset) else load(data, strict=strict)
