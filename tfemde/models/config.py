"""Dual-encoder configuration: one dataclass, saved as JSON with every run, and the named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Optional

IMAGE_INPUTS = ("pixels", "regions", "backbone")
POOLINGS = ("max", "mean", "gpo", "attention", "temde")
HEADS = ("vector", "set")
LOSSES = ("triplet", "info_nce")


# The type and range of every numeric and boolean field: (kind, lowest, highest); "(" / ")" mark open ends.
FIELD_RANGES = {
    **{field: ("int", 1, None) for field in (
        "image_size", "num_regions", "region_dim", "vocab_size", "max_length", "embed_dim", "word_dim", "num_slots",
        "set_depth", "set_heads", "attention_heads", "sketch_depth")},
    "sketch_bits": ("int", 1, 16),
    "cnn_blocks": ("int", 0, None),
    "warmup_epochs": ("int", 0, None),
    **{field: ("float", "(0", None) for field in (
        "ff_mult", "sketch_temperature", "alpha", "mmd_gamma", "learning_rate", "clipnorm")},
    "info_nce_temperature": ("optional float", "(0", None),
    **{field: ("float", 0, None) for field in (
        "sketch_weight", "margin", "mmd_weight", "diversity_weight", "centroid_weight", "weight_decay",
        "gpo_rank_prior")},
    "dropout": ("float", 0, "1)"),
    "set_lr_scale": ("optional float", "(0", None),
    "set_head_dim": ("optional int", 1, None),
    **{field: ("bool", None, None) for field in ("sketch", "sketch_layer_norm", "share_weights", "reference_masking",
                                                      "mixed_precision")},
}


# The InfoNCE temperature of a similarity bounded by 1. The sketch presets' similarity (set or vector cosine +
# λ · sketch cosine) is bounded by 1 + λ, and their temperature scales with it (`resolved_info_nce_temperature`).
# Validation split, quickstart budget, seeds 0-2, 0.07 for every preset against 0.05: dive_temde 324.9 / 319.8,
# temde 304.8 / 294.2, attention 296.0 / 289.4, dive 321.8 / 321.0, vse 307.4 / 312.4, vse_infty 316.6 / 318.9
# (README, "Limits and deviations"). A temperature learned as CLIP does fell to ~0.047 for dive_temde, worse.
INFO_NCE_TEMPERATURE = 0.05
# Fields whose default changed the model when they were added, with the value of the model before them.
FIELDS_ADDED_LATER = {"sketch_layer_norm": False, "gpo_rank_prior": 0.0}


def _check_field(field, value, kind, low, high):
    """`value` as a plain Python value (NumPy scalars become int/float, so the config stays JSON); one `ValueError`
    naming `field` unless it is of `kind` within `[low, high]`."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{field} must be true or false; got {value!r}")
        return value
    if kind.startswith("optional ") and value is None:
        return value
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    is_number = is_int or (isinstance(value, numbers.Real) and not isinstance(value, bool))
    low_open, high_open = isinstance(low, str), isinstance(high, str)
    low_value = float(low.strip("(")) if low_open else low
    high_value = float(high.strip(")")) if high_open else high
    bounds = (f"{'>' if low_open else '>='} {low_value:g}" if low is not None else "",
              f"{'<' if high_open else '<='} {high_value:g}" if high is not None else "")
    wanted = f"{'an integer' if kind.endswith('int') else 'a number'} {' and '.join(b for b in bounds if b)}".strip()
    if kind.endswith("int") and not is_int or not is_number or not math.isfinite(value):
        raise ValueError(f"{field} must be {wanted}; got {value!r}")
    if low is not None and (value <= low_value if low_open else value < low_value):
        raise ValueError(f"{field} must be {wanted}; got {value!r}")
    if high is not None and (value >= high_value if high_open else value > high_value):
        raise ValueError(f"{field} must be {wanted}; got {value!r}")
    if is_int:
        return int(value)
    return value if type(value) is float else float(value)


def _check_filters(filters):
    """`cnn_filters` as a tuple of positive ints (one strided convolution each)."""
    if isinstance(filters, (str, bytes)) or not isinstance(filters, (list, tuple)) or not filters or not all(
            isinstance(f, numbers.Integral) and not isinstance(f, bool) and f >= 1 for f in filters):
        raise ValueError(f"cnn_filters must be a non-empty list of positive integers, e.g. [32, 64, 128]; "
                         f"got {filters!r}")
    return tuple(int(f) for f in filters)


@dataclasses.dataclass
class DualEncoderConfig:
    """Everything needed to rebuild a dual encoder; every field can be overridden.

    Towers: `image_input` picks the image tower (`"pixels"`: a small CNN whose grid cells become the set, one
    strided 3x3 convolution per entry of `cnn_filters`, each followed by `cnn_blocks` residual 3x3 blocks;
    `"regions"`: precomputed region features through fc + residual MLP, as VSE∞/DivE; `"backbone"`: any
    `keras.applications` model by name, its last feature map becomes the set). The text tower is an embedding and a
    length-aware BiGRU with directions averaged.

    Heads: `head="vector"` pools each tower's local features into one vector with `pooling` (`max`, `mean`, `gpo`,
    `attention` = a masked self-attention block then mean pooling, `temde` = max pooling plus a projection of the
    T-EMDE sketch, which replaces self-attention as the global aggregator). `head="set"` predicts `num_slots`
    embeddings per item with DivE's `SetPrediction`. A vector is a set of one, and Smooth-Chamfer between sets of
    one is the cosine, so every preset is scored by one similarity:
    `S = SmoothChamfer_alpha(sets) + sketch_weight * sketch_cosine` (the second term only when `sketch=True`).
    """

    preset: str = "dive_temde"
    # data-facing sizes
    image_input: str = "pixels"
    image_size: int = 64
    num_regions: int = 36
    region_dim: int = 2048
    backbone: Optional[str] = None
    backbone_weights: Optional[str] = None
    vocab_size: int = 1000
    max_length: int = 32
    # joint space and towers
    embed_dim: int = 1024
    word_dim: int = 300
    cnn_filters: tuple = (32, 64, 128)
    cnn_blocks: int = 0
    dropout: float = 0.1
    # heads
    head: str = "set"
    pooling: str = "max"
    # GPO (pooling="gpo"): `gpo_rank_prior · r` off the score of rank r, so that an untrained GPO starts near max
    # pooling instead of a random weighting of the ranks (0 is VSE-infinity's). vse_infty at the quickstart budget,
    # validation RSUM, seeds 0-4: 331.3 / 315.1 / 310.3 / 316.1 / 299.3 with 0.1, 316.6 / 288.7 / 313.1 / 290.2 / 287.6
    # with 0 (0.3: 307.1 / 311.8 on seeds 0 / 1; 0.05: 312.1 / 316.6 / 299.0 on seeds 0-2).
    gpo_rank_prior: float = 0.1
    num_slots: int = 4
    set_depth: int = 4
    set_heads: int = 4
    # None: 2 * embed_dim // set_heads per head, the reference's ratio (4 x 512 at D = 1024).
    set_head_dim: Optional[int] = None
    ff_mult: int = 4
    share_weights: bool = True
    reference_masking: bool = False
    attention_heads: int = 8
    # T-EMDE sketch, shared by both towers in the joint space
    sketch: bool = True
    sketch_depth: int = 16
    sketch_bits: int = 6
    sketch_temperature: float = 1.0
    # Each token standardised before the hyperplanes (TEMDESketch's layer_norm): without it the towers' features are
    # too small for the hyperplanes, every token lands in every bucket alike and the sketch is nearly constant
    # (dive_temde at the quickstart budget: sketch-only validation RSUM 37 without, 148 with; the model 296 / 313).
    sketch_layer_norm: bool = True
    sketch_weight: float = 0.5
    # similarity and loss (ALGORITHMS.md §3.3-3.4)
    alpha: float = 16.0
    # A deviation from the papers: their hardest-negative triplet (loss="triplet", with the VSE0 warm-up) collapses
    # when the towers train from scratch or the data is small (loss stuck at 2 x margin, chance retrieval).
    loss: str = "info_nce"
    margin: float = 0.2
    reduction: str = "mean"
    warmup_epochs: int = 1
    # None: INFO_NCE_TEMPERATURE per unit of the similarity's range, which the sketch term widens from 1 to 1 + λ
    # (`resolved_info_nce_temperature`).
    info_nce_temperature: Optional[float] = None
    mmd_weight: float = 0.01
    mmd_gamma: float = 0.5
    diversity_weight: float = 0.01
    # Image-to-image centroid triplet loss (Wieczorek et al. 2021): each image against the leave-one-out centroid of
    # its group in the batch and the most similar other group's centroid, with `margin`; 0 turns it off. Useful with
    # several images a group in a batch (`train(instances_per_group=M)`, e.g. the emoji set's two styles).
    centroid_weight: float = 0.0
    # optimisation (ALGORITHMS.md §3.5)
    learning_rate: float = 1e-3
    # DivE trains its set-prediction modules at 0.1x on pretrained region features; towers that learn from scratch
    # need them at full speed (dive_temde at the quickstart budget: validation RSUM 151 at 1x against 134 at 0.1x).
    # None picks 0.1 for image_input="regions" and 1.0 otherwise (`resolved_set_lr_scale`).
    set_lr_scale: Optional[float] = None
    weight_decay: float = 1e-4
    clipnorm: float = 1.0
    mixed_precision: bool = False

    def __post_init__(self):
        self.cnn_filters = _check_filters(self.cnn_filters)
        for field, allowed in (("image_input", IMAGE_INPUTS), ("pooling", POOLINGS), ("head", HEADS),
                               ("loss", LOSSES), ("reduction", ("mean", "sum"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}; got {getattr(self, field)!r}")
        for field, (kind, low, high) in FIELD_RANGES.items():
            setattr(self, field, _check_field(field, getattr(self, field), kind, low, high))
        for field in ("preset", "backbone", "backbone_weights"):
            value = getattr(self, field)
            if not (isinstance(value, str) or (value is None and field != "preset")):
                raise ValueError(f"{field} must be a string{'' if field == 'preset' else ' or None'}; got {value!r}")
        if self.image_input == "backbone" and not self.backbone:
            raise ValueError("image_input='backbone' needs backbone=<a keras.applications name>, e.g. 'MobileNetV2'")
        if self.pooling == "temde" and not self.sketch:
            raise ValueError("pooling='temde' projects the T-EMDE sketch, so it needs sketch=True")

    @property
    def set_size(self) -> int:
        """K, the number of embeddings per item (1 for vector heads)."""
        return self.num_slots if self.head == "set" else 1

    @property
    def resolved_set_lr_scale(self) -> float:
        """The set-prediction learning-rate scale in use: `set_lr_scale`, or its default for `image_input`."""
        if self.set_lr_scale is not None:
            return float(self.set_lr_scale)
        return 0.1 if self.image_input == "regions" else 1.0

    @property
    def resolved_info_nce_temperature(self) -> float:
        """The InfoNCE temperature in use: `info_nce_temperature`, or `INFO_NCE_TEMPERATURE · (1 + sketch_weight)`
        when the similarity adds the sketch term (cosines bounded by 1 + λ), `INFO_NCE_TEMPERATURE` otherwise."""
        if self.info_nce_temperature is not None:
            return float(self.info_nce_temperature)
        return INFO_NCE_TEMPERATURE * (1.0 + (self.sketch_weight if self.sketch else 0.0))

    @property
    def sketch_size(self) -> int:
        """The flattened sketch length depth * 2**bits (0 without a sketch)."""
        return self.sketch_depth * 2**self.sketch_bits if self.sketch else 0

    def replace(self, **overrides) -> "DualEncoderConfig":
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["cnn_filters"] = list(self.cnn_filters)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "DualEncoderConfig":
        """A config from `to_dict`'s values; a field missing from them (a config saved before the field existed)
        takes the value that rebuilds the model it was saved from (`FIELDS_ADDED_LATER`), else its default."""
        return cls().replace(**{**FIELDS_ADDED_LATER, **values})

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "DualEncoderConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"config file {path} is not valid JSON ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object of config fields; got {type(values).__name__}")
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"config file {path}: {error}") from None


# The rows of ARCHITECTURE.md's preset table: the fields that differ from the dataclass defaults. Presets differ
# only in their heads and similarity; all train with the same optimisation (DivE's), so that a comparison between
# them is an ablation. VSE∞'s own recipe is `reduction="sum", learning_rate=5e-4, clipnorm=2.0` (ALGORITHMS.md §1.4).
PRESETS = {
    "vse": dict(head="vector", pooling="max", sketch=False),
    "vse_infty": dict(head="vector", pooling="gpo", sketch=False),
    "attention": dict(head="vector", pooling="attention", sketch=False),
    "temde": dict(head="vector", pooling="temde", sketch=True),
    "dive": dict(head="set", sketch=False),
    "dive_temde": dict(head="set", sketch=True),
}
DEFAULT_PRESET = "dive_temde"


def preset(name: str = DEFAULT_PRESET, **overrides) -> DualEncoderConfig:
    """The config of a named preset (`vse`, `vse_infty`, `attention`, `temde`, `dive`, `dive_temde`), overridden.

    Example:
        >>> config = preset("dive", embed_dim=256, num_slots=2)
        >>> config.set_size
        2
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DualEncoderConfig(preset=name).replace(**{**PRESETS[name], **overrides})
