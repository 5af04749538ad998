"""tfemde: fast cross-modal (image <-> text) retrieval with Keras 3.

T-EMDE sketching, slot-attention set prediction and the Smooth-Chamfer loss in a dual encoder trained with
`model.fit`, exported to ONNX and served with onnxruntime.

`import tfemde` is lazy: it imports TensorFlow only when a training-side name is first used, so that
`tfemde.serving` runs in applications without TensorFlow.
"""

import importlib
import os

from tfemde import _moved

__version__ = "0.1.0"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

_moved.install()  # tfemde.runs, tfemde.callbacks, ...: the 0.1 module names, at their new homes

# public name -> module that defines it
_LAZY = {
    "layers": "tfemde.layers",
    "losses": "tfemde.losses",
    "similarity": "tfemde.similarity",
    "data": "tfemde.data",
    "text": "tfemde.text",
    "models": "tfemde.models",
    "evaluation": "tfemde.evaluation",
    "training": "tfemde.training",
    "export": "tfemde.export",
    "serving": "tfemde.serving",
    "TEMDESketch": "tfemde.layers",
    "SetPrediction": "tfemde.layers",
    "SlotAttention": "tfemde.layers",
    "GPO": "tfemde.layers",
    "sketch_similarity": "tfemde.layers",
    "smooth_chamfer_similarity": "tfemde.losses",
    "Tokenizer": "tfemde.text",
    "load_dataset": "tfemde.data",
    "build_dual_encoder": "tfemde.models",
    "DualEncoder": "tfemde.models",
    "load_model": "tfemde.models",
    "retrieval_metrics": "tfemde.evaluation",
    "evaluate": "tfemde.evaluation",
    "export_run": "tfemde.export",
}

__all__ = sorted(_LAZY) + ["__version__"]


# What only the `train` extra installs (`pip install "tfemde[train]"`); the base install is the serving runtime.
TRAIN_ONLY_MODULES = ("tensorflow", "keras", "tensorflow_text", "tf2onnx", "onnx", "matplotlib", "tqdm")


def train_extra_hint(module: str) -> str:
    """The message for a training-side name used in a serving-only install (`module` is what failed to import)."""
    return (f"{module} is not installed: training, evaluation and export need the train extra, "
            "pip install \"tfemde[train]\" (the base install is the TensorFlow-free serving runtime)")


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfemde' has no attribute {name!r}")
    try:
        module = importlib.import_module(_LAZY[name])
        value = module if _LAZY[name] == f"tfemde.{name}" else getattr(module, name)
    except ModuleNotFoundError as error:
        if error.name not in TRAIN_ONLY_MODULES:
            raise
        raise ModuleNotFoundError(train_extra_hint(error.name), name=error.name) from error
    globals()[name] = value
    return value


def __dir__():
    return __all__
