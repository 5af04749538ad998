"""Data sets (built-in emoji, Karpathy JSON, precomputed regions, JSONL) and tf.data pipelines."""

from tfemde.data.dataset import SPLITS, Dataset
