"""Dual encoders: configs and presets, towers, the `DualEncoder` model and its optimizer."""

from tfemde.models.config import DEFAULT_PRESET, PRESETS, DualEncoderConfig, preset
from tfemde.models.dual_encoder import (
    DualEncoder,
    build_dual_encoder,
    image_inputs,
    load_model,
    save_model,
    text_inputs,
)
from tfemde.models.optimization import CosineDecayPerStep, ScaledAdamW, make_optimizer
