"""The dual encoder: a functional `keras.Model` whose `compute_loss` scores the batch with the set similarity."""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers, ops

from tfemde import losses
from tfemde.similarity import similarity as set_similarity
from tfemde.files import atomic_write
from tfemde.layers import (
    GPO,
    MaskedMaxPooling,
    MaskedMeanPooling,
    SelfAttentionBlock,
    SetPrediction,
    TEMDESketch,
    UnitNormalize,
)
from tfemde.models.config import DualEncoderConfig, preset
from tfemde.models.optimization import CosineDecayPerStep, make_optimizer
from tfemde.layers.replicas import gather_global_batch, in_multi_worker_mode, scale_for_replicas
from tfemde.models.towers import image_tower, text_tower

IMAGE_INPUT_NAMES = {"pixels": ("image",), "backbone": ("image",), "regions": ("regions", "region_mask")}
TEXT_INPUT_NAMES = ("caption_ids", "caption_mask")
# The batch entries that say which images and captions are positives (`tfemde.losses.positive_mask`).
POSITIVE_KEYS = ("image_id", "group_id", "text_id", "caption_image_id", "caption_group_id")


def image_inputs(config):
    """The named symbolic image inputs of a config: `image [B,H,W,3]` or `regions [B,R,F]` + `region_mask [B,R]`."""
    if config.image_input == "regions":
        return {
            "regions": keras.Input((None, config.region_dim), name="regions", dtype="float32"),
            "region_mask": keras.Input((None,), name="region_mask", dtype="bool"),
        }
    size = config.image_size
    return {"image": keras.Input((size, size, 3), name="image", dtype="float32")}


def text_inputs(config):
    """The named symbolic text inputs: `caption_ids [B,T]` int32 and `caption_mask [B,T]` bool."""
    return {
        "caption_ids": keras.Input((None,), name="caption_ids", dtype="int32"),
        "caption_mask": keras.Input((None,), name="caption_mask", dtype="bool"),
    }


def _vector_head(config, tower, modality, shared):
    """Pool a tower's local features into one unit vector, returned as a set of one `[B, 1, D]`."""
    if config.pooling == "max":
        pooled = MaskedMaxPooling(name=f"{modality}_pool")(tower.local, mask=tower.mask)
    elif config.pooling == "mean":
        pooled = MaskedMeanPooling(name=f"{modality}_pool")(tower.local, mask=tower.mask)
    elif config.pooling == "gpo":
        pooled = GPO(rank_prior=config.gpo_rank_prior, name=f"{modality}_gpo")(tower.local, mask=tower.mask)
    elif config.pooling == "attention":
        pooled = SelfAttentionBlock(config.attention_heads, config.dropout, name=f"{modality}_self_attention")(
            tower.local, mask=tower.mask)
    else:  # temde: the sketch replaces self-attention as the global aggregator (ALGORITHMS.md §5.3 fusion (b))
        pooled = MaskedMaxPooling(name=f"{modality}_pool")(tower.local, mask=tower.mask)
        projected = shared["sketch_projection"](shared["flatten"][modality](shared["sketches"][modality]))
        pooled = layers.Add(name=f"{modality}_pool_plus_sketch")([pooled, projected])
    vector = UnitNormalize(name=f"{modality}_normalize")(pooled)
    return layers.Reshape((1, config.embed_dim), name=f"{modality}_set")(vector), None


def _set_head(config, tower, modality):
    """DivE's set prediction: `[B, K, D]` unit elements and the unit residual set (for the diversity loss)."""
    module = SetPrediction(
        num_slots=config.num_slots, dim=config.embed_dim, depth=config.set_depth, num_heads=config.set_heads,
        head_dim=config.set_head_dim,
        ff_mult=config.ff_mult, dropout=config.dropout, share_weights=config.share_weights,
        positional_encoding=(modality == "text"), reference_masking=config.reference_masking,
        name=f"{modality}_set_prediction",
    )
    elements, residual = module(tower.set_inputs, tower.global_, mask=tower.mask, return_residual=True)
    return elements, residual


def _build_graph(config):
    image_in, text_in = image_inputs(config), text_inputs(config)
    towers = {
        "image": image_tower(config, image_in),
        "text": text_tower(config, text_in["caption_ids"], text_in["caption_mask"]),
    }
    shared = {}
    if config.sketch:
        # One sketch for both towers: both modalities are histograms over the same regions of the joint space.
        sketch = TEMDESketch(config.sketch_depth, config.sketch_bits, temperature=config.sketch_temperature,
                             layer_norm=config.sketch_layer_norm,
                             name="sketch")
        shared["sketches"] = {m: sketch(t.local, mask=t.mask) for m, t in towers.items()}
        shared["flatten"] = {m: layers.Reshape((config.sketch_size,), name=f"{m}_sketch") for m in towers}
        shared["sketch_projection"] = layers.Dense(config.embed_dim, name="sketch_projection")
    outputs, encoders = {}, {}
    for modality, tower in towers.items():
        if config.head == "set":
            elements, residual = _set_head(config, tower, modality)
        else:
            elements, residual = _vector_head(config, tower, modality, shared)
        encoder_outputs = {"set": elements}
        outputs[f"{modality}_set"] = elements
        if residual is not None:
            outputs[f"{modality}_residual"] = residual
        if config.sketch:
            flat = shared["flatten"][modality](shared["sketches"][modality])
            outputs[f"{modality}_sketch"] = flat
            encoder_outputs["sketch"] = flat
        encoders[modality] = encoder_outputs
    return {**image_in, **text_in}, outputs, (image_in, encoders["image"]), (text_in, encoders["text"])


@keras.saving.register_keras_serializable(package="tfemde")
class DualEncoder(keras.Model):
    """A functional image/text dual encoder scored by Smooth-Chamfer (+ λ·sketch cosine) and trained with `fit`.

    Inputs (a dict): `image [Bi,H,W,3]` float in [0, 1] or `regions [Bi,R,F]` + `region_mask [Bi,R]`;
    `caption_ids [Bc,T]` int32 + `caption_mask [Bc,T]`; for training also the keys of `positive_mask`:
    `image_id [B]` (and `group_id [B]`) for paired batches (Bi = Bc), or `image_id [Bi]` + `caption_image_id [Bc]`
    for separately batched items and captions. Captions and images with the same id (or group) are positives, so
    several captions of one image in a batch are all masked out of each other's negatives.

    Outputs (a dict): `image_set`, `text_set` `[B, K, D]` unit elements; `image_sketch`, `text_sketch`
    `[B, depth * 2**bits]` when the sketch is on; `image_residual`, `text_residual` for set heads.

    `image_encoder` and `text_encoder` are standalone `keras.Model`s cut from the same graph (they share weights),
    with outputs `{"set", "sketch"}`; export uses them.

    Example:
        >>> model = build_dual_encoder(preset("dive_temde", embed_dim=64, vocab_size=100))
        >>> model.compile()
        >>> # model.fit(tfemde.data.train_dataset(...), epochs=...)
    """

    def __init__(self, config=None, **kwargs):
        if config is None:
            config = DualEncoderConfig()
        elif not isinstance(config, DualEncoderConfig):
            config = DualEncoderConfig.from_dict(config)
        # The layers take the dtype policy in force when they are made; the process-wide policy is put back after,
        # so building (or loading) a mixed-precision model changes no model built later.
        previous = keras.config.dtype_policy()
        if config.mixed_precision:
            keras.config.set_dtype_policy("mixed_float16")
        try:
            inputs, outputs, image_io, text_io = _build_graph(config)
        finally:
            keras.config.set_dtype_policy(previous)
        kwargs.pop("inputs", None), kwargs.pop("outputs", None)
        super().__init__(inputs=inputs, outputs=outputs, name=kwargs.pop("name", f"dual_encoder_{config.preset}"),
                         **kwargs)
        # Not tracked as sub-layers: they share this model's layers and weights.
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_encoders", {
            "image": keras.Model(image_io[0], image_io[1], name="image_encoder"),
            "text": keras.Model(text_io[0], text_io[1], name="text_encoder"),
        })
        self._hardest_negatives = keras.Variable(float(config.warmup_epochs <= 0), trainable=False,
                                                 dtype="float32", name="hardest_negatives")

    @property
    def image_encoder(self) -> keras.Model:
        return self._encoders["image"]

    @property
    def text_encoder(self) -> keras.Model:
        return self._encoders["text"]

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

    def __call__(self, inputs, *args, **kwargs):
        # Batches carry image_id / group_id for the loss; the graph takes only its named inputs.
        if isinstance(inputs, dict):
            names = {tensor.name for tensor in self.inputs}
            inputs = {name: value for name, value in inputs.items() if name in names}
        return super().__call__(inputs, *args, **kwargs)

    # --- training -------------------------------------------------------------------------------------------
    def similarity(self, image_outputs, text_outputs):
        """`[Bi, Bc]` float32: Smooth-Chamfer over the sets + sketch_weight · sketch cosine (config's α and λ)."""
        config = self.config
        return set_similarity(image_outputs, text_outputs, alpha=config.alpha,
                              sketch_weight=config.sketch_weight if config.sketch else 0.0,
                              sketch_depth=config.sketch_depth)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The loss of the global batch: under a `tf.distribute` strategy every replica gathers the embeddings and
        ids of all replicas (`tfemde.layers.replicas`), so its images meet the captions of the whole batch as
        negatives, and returns the loss divided by the replica count, as Keras expects."""
        if not isinstance(x, dict) or "image_id" not in x:
            raise ValueError("DualEncoder batches must be dicts with an 'image_id' [B] entry (the positives' key); "
                             f"got {type(x).__name__} with keys {sorted(x) if isinstance(x, dict) else None}")
        ids = {key: x[key] for key in POSITIVE_KEYS if key in x}
        batch = gather_global_batch({**ids, **y_pred})
        return scale_for_replicas(self._batch_loss(batch, {key: batch[key] for key in ids}))

    def _batch_loss(self, y_pred, ids):
        config = self.config
        score = self.similarity({"set": y_pred["image_set"], "sketch": y_pred.get("image_sketch")},
                                {"set": y_pred["text_set"], "sketch": y_pred.get("text_sketch")})
        positives = losses.positive_mask(ids)
        if config.loss == "info_nce":
            loss = losses.info_nce_loss(score, positives, temperature=config.resolved_info_nce_temperature)
        else:
            loss = ops.cond(
                self._hardest_negatives > 0.5,
                lambda: losses.triplet_loss(score, positives, margin=config.margin, hardest=True,
                                            reduction=config.reduction),
                lambda: losses.triplet_loss(score, positives, margin=config.margin, hardest=False,
                                            reduction=config.reduction),
            )
        if config.head == "set":
            if config.mmd_weight:
                loss = loss + config.mmd_weight * losses.mmd_loss(y_pred["image_set"], y_pred["text_set"],
                                                                  gamma=config.mmd_gamma)
            if config.diversity_weight:
                loss = loss + config.diversity_weight * (losses.diversity_loss(y_pred["image_residual"])
                                                         + losses.diversity_loss(y_pred["text_residual"]))
        if config.centroid_weight:
            labels = ids["group_id"] if "group_id" in ids else ids["image_id"]
            loss = loss + config.centroid_weight * losses.centroid_triplet_loss(
                self.similarity, y_pred["image_set"], labels, sketches=y_pred.get("image_sketch"),
                margin=config.margin)
        return loss

    def train_step(self, data):
        return _reducible_logs(super().train_step(data))

    def test_step(self, data):
        return _reducible_logs(super().test_step(data))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 (backend/tensorflow/trainer.py) builds a model made under a strategy from one data batch, which
        # it first reduces over the replicas with MEAN; TensorFlow has no bool AddN, so the bool `caption_mask`
        # fails there. Only shapes and dtypes are needed: take the first replica's batch instead.
        if self._distribute_strategy is None:
            return
        import tensorflow as tf

        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        data_batch = tf.nest.map_structure(
            lambda value: self.distribute_strategy.experimental_local_results(value)[0]
            if isinstance(value, tf.distribute.DistributedValues) else value, data_batch)
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def compile(self, optimizer=None, **kwargs):
        """Compile with the papers' optimizer by default (`make_optimizer`); `loss` is the model's own.

        A `mixed_precision` model gets its optimizer wrapped in a `LossScaleOptimizer` (dynamic loss scaling, so that
        small float16 gradients do not flush to zero). Keras does that only for a model whose own policy is
        mixed_float16; a DualEncoder's policy is per layer.
        """
        if kwargs.get("loss") is not None:
            raise ValueError("DualEncoder computes its own loss from its config (config.loss); do not pass loss=")
        optimizer = optimizer or make_optimizer(self.config)
        if (self.config.mixed_precision and kwargs.get("auto_scale_loss", True)
                and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
            optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.get(optimizer))
        super().compile(optimizer=optimizer, **kwargs)

    def fit(self, x=None, *args, epochs=1, steps_per_epoch=None, callbacks=None, initial_epoch=0, **kwargs):
        """`keras.Model.fit`, plus two things the papers' recipe needs.

        The cosine schedule (when the optimizer uses `CosineDecayPerStep`) is set to anneal over this run's
        `epochs * steps per epoch`, and the first `config.warmup_epochs` epochs use all negatives (VSE0) before
        hardest negatives take over.
        """
        steps = steps_per_epoch or _cardinality(x)
        schedule = getattr(self.optimizer, "_learning_rate", None)
        if isinstance(schedule, CosineDecayPerStep) and steps:
            schedule.decay_steps.assign(float(steps * epochs))
        callbacks = list(callbacks or []) + [NegativesWarmup(self.config.warmup_epochs)]
        if _is_tf_dataset(x):
            kwargs.setdefault("shuffle", False)  # a tf.data pipeline shuffles itself; Keras would only warn
        return super().fit(x, *args, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                           initial_epoch=initial_epoch, **kwargs)


def _reducible_logs(logs):
    """The step's logs, each `[1]` instead of a scalar on several workers.

    Keras 3.15 reduces a step's logs over the workers of a MultiWorkerMirroredStrategy with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar ("Invalid reduction dimension 0 for input with
    0 dimensions", keras-team/keras#20585, tensorflow/tensorflow#72388); a `[1]` value reduces to the same scalar.
    """
    import tensorflow as tf

    if not in_multi_worker_mode():
        return logs
    return {name: tf.reshape(value, [1]) if getattr(value, "shape", None) == () else value
            for name, value in logs.items()}


def _is_tf_dataset(data) -> bool:
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return isinstance(data, tf.data.Dataset)


def _cardinality(data):
    """The number of batches of a finite `tf.data.Dataset`, else None."""
    try:
        import tensorflow as tf

        if isinstance(data, tf.data.Dataset):
            n = int(data.cardinality())
            return n if n > 0 else None
    except Exception:  # noqa: BLE001 - any other input type: unknown length
        return None
    return None


class NegativesWarmup(keras.callbacks.Callback):
    """Uses all negatives for the first `epochs` epochs (VSE0), hardest negatives after (ALGORITHMS.md §1.3)."""

    def __init__(self, epochs=1):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.model._hardest_negatives.assign(float(epoch >= self.epochs))


def build_dual_encoder(config=None, **overrides) -> DualEncoder:
    """Build a `DualEncoder` from a config, a preset name, or the default preset, with field overrides.

    Example:
        >>> model = build_dual_encoder("vse", embed_dim=64, vocab_size=100)
        >>> sorted(model.output)
        ['image_set', 'text_set']
    """
    if config is None or isinstance(config, str):
        config = preset(config or "dive_temde", **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return DualEncoder(config)


def load_model(path) -> DualEncoder:
    """Load a `.keras` file saved from a `DualEncoder` (imports tfemde's layers first, so they deserialize)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - zip, h5 and deserialization errors alike: name the file
        raise ValueError(f"model file {path} cannot be read (truncated or not a .keras file?): "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error


def save_model(model, path) -> Path:
    """Save `model` as `.keras` through a temporary file moved into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, model.save)
    return path
