"""Data sets (built-in emoji, Karpathy JSON, precomputed regions, JSONL) and tf.data pipelines.

The readers need only NumPy; the tf.data pipelines (`train_dataset`, `eval_dataset`, `EvalData`) import
TensorFlow when first used, so `tfemde.data.load("emoji")` stays quick.
"""

import importlib

from tfemde.data.build_emoji import build_emoji
from tfemde.data.builtin import read_emoji_file
from tfemde.data.dataset import SPLITS, Dataset
from tfemde.data.precomp import StackedRows, read_precomp
from tfemde.data.common import DataWarning
from tfemde.data.readers import load, read_jsonl, read_karpathy
from tfemde.data.readers import load as load_dataset

_PIPELINES = ("EvalData", "NO_AUGMENTATION", "caption_text_ids", "eval_dataset", "train_dataset", "decode_image_file")


def __getattr__(name):
    if name in _PIPELINES:
        value = getattr(importlib.import_module("tfemde.data.pipelines"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tfemde.data' has no attribute {name!r}")
