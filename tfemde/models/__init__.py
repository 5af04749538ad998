"""Dual encoders: configs and presets, towers, the `DualEncoder` model and its optimizer; reading a run folder.

The configs (`DualEncoderConfig`, `PRESETS`) and `run_folder` import no TensorFlow; the model and optimizer names
import Keras when first used, so `tfemde.models.run_folder` and the CLI's argument parsing stay light.
"""

import importlib

from tfemde.models.config import DEFAULT_PRESET, PRESETS, DualEncoderConfig, preset

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "DualEncoder": "tfemde.models.dual_encoder",
    "build_dual_encoder": "tfemde.models.dual_encoder",
    "image_inputs": "tfemde.models.dual_encoder",
    "load_model": "tfemde.models.dual_encoder",
    "save_model": "tfemde.models.dual_encoder",
    "text_inputs": "tfemde.models.dual_encoder",
    "CosineDecayPerStep": "tfemde.models.optimization",
    "ScaledAdamW": "tfemde.models.optimization",
    "make_optimizer": "tfemde.models.optimization",
}

__all__ = sorted(["DEFAULT_PRESET", "PRESETS", "DualEncoderConfig", "preset", *_LAZY])


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfemde.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
