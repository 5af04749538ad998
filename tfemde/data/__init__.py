"""Data sets (built-in emoji, Karpathy JSON, precomputed regions, JSONL) and tf.data pipelines."""

from tfemde.data.dataset import SPLITS, Dataset
from tfemde.data.pipelines import EvalData, eval_dataset, train_dataset
from tfemde.data.build_emoji import build_emoji
from tfemde.data.builtin import read_emoji_file
from tfemde.data.precomp import StackedRows, read_precomp
from tfemde.data.readers import DataWarning, load, read_jsonl, read_karpathy
from tfemde.data.readers import load as load_dataset
