"""DualEncoder: every preset builds, trains with falling loss, round-trips through .keras, ignores padding."""

import dataclasses
import json
import re

import numpy as np
import pytest

import keras
import tensorflow as tf

from tfemde.models import (
    PRESETS,
    CosineDecayPerStep,
    DualEncoderConfig,
    ScaledAdamW,
    build_dual_encoder,
    load_model,
    preset,
    save_model,
)

TINY = dict(embed_dim=32, word_dim=12, vocab_size=40, max_length=8, num_slots=3, set_depth=2, set_heads=2,
            ff_mult=2, sketch_depth=4, sketch_bits=3, attention_heads=2, dropout=0.0)
REGIONS = dict(image_input="regions", num_regions=6, region_dim=10)


def region_batch(rng, batch=8, regions=6, region_dim=10, length=8, vocab=40, num_images=None):
    """A batch where caption tokens are a function of the image, so a model can learn the match."""
    num_images = num_images or batch
    image_id = np.arange(batch) % num_images
    protos = rng.normal(size=(num_images, regions, region_dim)).astype("float32")
    lengths = rng.integers(3, length + 1, size=batch)
    ids = np.zeros((batch, length), "int32")
    for i in range(batch):
        ids[i, : lengths[i]] = 1 + (image_id[i] * 7 + np.arange(lengths[i]) * 3) % (vocab - 1)
    return {
        "regions": protos[image_id],
        "region_mask": np.ones((batch, regions), bool),
        "caption_ids": ids,
        "caption_mask": ids > 0,
        "image_id": image_id.astype("int64"),
    }


def encode(model, batch):
    out = model({k: v for k, v in batch.items() if k != "image_id"}, training=False)
    return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_with_falling_loss_and_round_trips(name, rng, tmp_path):
    model = build_dual_encoder(name, **TINY, **REGIONS, warmup_epochs=0, learning_rate=3e-3)
    model.compile()
    batch = region_batch(rng)
    data = tf.data.Dataset.from_tensors(batch).repeat(12)
    history = model.fit(data, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], f"{name}: loss did not fall: {losses}"

    expected = encode(model, batch)
    assert expected["image_set"].shape == (8, model.config.set_size, 32)
    np.testing.assert_allclose(np.linalg.norm(expected["text_set"], axis=-1), 1.0, atol=1e-5)
    path = save_model(model, tmp_path / "model.keras")
    restored = load_model(path)
    assert restored.config == model.config
    got = encode(restored, batch)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["dive_temde", "vse_infty", "attention", "temde"])
def test_outputs_do_not_change_with_padding(name, rng):
    model = build_dual_encoder(name, **TINY, **REGIONS)
    batch = region_batch(rng, batch=4)
    padded = dict(batch)
    extra = 5
    padded["regions"] = np.concatenate([batch["regions"], 1e3 * rng.normal(size=(4, extra, 10))], 1).astype("float32")
    padded["region_mask"] = np.concatenate([batch["region_mask"], np.zeros((4, extra), bool)], 1)
    garbage_ids = rng.integers(1, 40, size=(4, extra)).astype("int32")
    ids = batch["caption_ids"].copy()
    padded["caption_ids"] = np.concatenate([np.where(batch["caption_mask"], ids, 7), garbage_ids], 1)
    padded["caption_mask"] = np.concatenate([batch["caption_mask"], np.zeros((4, extra), bool)], 1)
    expected, got = encode(model, batch), encode(model, padded)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=2e-5, err_msg=key)


def test_pixel_tower_and_encoders_match_the_dual_model(rng):
    model = build_dual_encoder("dive_temde", **TINY, image_input="pixels", image_size=16, cnn_filters=(4, 8))
    images = rng.uniform(size=(3, 16, 16, 3)).astype("float32")
    ids = rng.integers(1, 40, size=(3, 8)).astype("int32")
    dual = model({"image": images, "caption_ids": ids, "caption_mask": ids > 0}, training=False)
    image = model.image_encoder({"image": images}, training=False)
    text = model.text_encoder({"caption_ids": ids, "caption_mask": ids > 0}, training=False)
    assert sorted(image) == ["set", "sketch"] and sorted(text) == ["set", "sketch"]
    assert image["set"].shape == (3, 3, 32) and image["sketch"].shape == (3, 4 * 8)
    np.testing.assert_array_equal(image["set"], dual["image_set"])
    np.testing.assert_array_equal(text["sketch"], dual["text_sketch"])


def test_compute_loss_equals_numpy_triplet_with_all_positives_masked(rng):
    """vse: cosine similarity, hardest-negative triplet (sum), positives from image_id (two captions share image 0)."""
    model = build_dual_encoder("vse", **TINY, **REGIONS, loss="triplet", warmup_epochs=0, reduction="sum")
    batch = region_batch(rng, batch=5, num_images=4)  # rows 0 and 4 are the same image
    out = encode(model, batch)
    loss = float(model.compute_loss(x=batch, y_pred={k: tf.constant(v) for k, v in out.items()}))

    s = out["image_set"][:, 0] @ out["text_set"][:, 0].T
    positive = batch["image_id"][:, None] == batch["image_id"][None, :]
    expected = 0.0
    for i, c in zip(*np.nonzero(positive)):
        expected += max(0.0, (0.2 + s[i][~positive[i]] - s[i, c]).max())  # image i against negative captions
        expected += max(0.0, (0.2 + s[:, c][~positive[:, c]] - s[i, c]).max())  # caption c against negative images
    assert loss == pytest.approx(expected, rel=1e-4)


def test_captions_with_equal_text_are_positives_of_each_others_images(rng):
    """text_id: images 1 and 3 both have a caption reading the same, so neither caption is the other's negative."""
    model = build_dual_encoder("vse", **TINY, **REGIONS, loss="triplet", warmup_epochs=0, reduction="sum")
    batch = region_batch(rng, batch=5, num_images=4)
    batch["text_id"] = np.array([10, 11, 12, 11, 10], dtype="int64")  # rows 0/4 share an image, 1/3 only a text
    out = encode(model, {k: v for k, v in batch.items() if k != "text_id"})
    loss = float(model.compute_loss(x=batch, y_pred={k: tf.constant(v) for k, v in out.items()}))

    s = out["image_set"][:, 0] @ out["text_set"][:, 0].T
    positive = ((batch["image_id"][:, None] == batch["image_id"][None, :])
                | (batch["text_id"][:, None] == batch["text_id"][None, :]))
    assert positive[1, 3] and positive[3, 1] and not positive[0, 1]
    expected = 0.0
    for i, c in zip(*np.nonzero(positive)):
        expected += max(0.0, (0.2 + s[i][~positive[i]] - s[i, c]).max())
        expected += max(0.0, (0.2 + s[:, c][~positive[:, c]] - s[i, c]).max())
    assert loss == pytest.approx(expected, rel=1e-4)
    without = float(model.compute_loss(x={k: v for k, v in batch.items() if k != "text_id"},
                                       y_pred={k: tf.constant(v) for k, v in out.items()}))
    assert without != pytest.approx(loss, rel=1e-6)


def test_separately_batched_images_and_captions(rng):
    """DivE batching: 3 images once each, 6 captions (two per image) with caption_image_id; loss vs NumPy."""
    model = build_dual_encoder("vse", **TINY, **REGIONS, loss="triplet", warmup_epochs=0, reduction="mean")
    pairs = region_batch(rng, batch=6, num_images=3)
    batch = {"regions": pairs["regions"][:3], "region_mask": pairs["region_mask"][:3], "image_id": np.arange(3),
             "caption_ids": pairs["caption_ids"], "caption_mask": pairs["caption_mask"],
             "caption_image_id": pairs["image_id"]}
    out = encode(model, {k: v for k, v in batch.items() if k != "caption_image_id"})
    assert out["image_set"].shape[0] == 3 and out["text_set"].shape[0] == 6
    loss = float(model.compute_loss(x=batch, y_pred={k: tf.constant(v) for k, v in out.items()}))
    s = out["image_set"][:, 0] @ out["text_set"][:, 0].T
    positive = np.arange(3)[:, None] == batch["caption_image_id"][None, :]
    i2t = [max(0.0, (0.2 + s[i][~positive[i]] - s[i, c]).max()) for i, c in zip(*np.nonzero(positive))]
    t2i = [max(0.0, (0.2 + s[:, c][~positive[:, c]] - s[i, c]).max()) for i, c in zip(*np.nonzero(positive))]
    assert loss == pytest.approx(np.mean(i2t) + np.mean(t2i), rel=1e-4)
    model.compile()
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(3), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_negatives_warmup_switches_after_the_first_epoch(rng):
    model = build_dual_encoder("vse", **TINY, **REGIONS, loss="triplet", warmup_epochs=1)
    model.compile()
    seen = []
    probe = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, l: seen.append(float(model._hardest_negatives)))
    model.fit(tf.data.Dataset.from_tensors(region_batch(rng)).repeat(2), epochs=3, verbose=0, callbacks=[probe])
    assert seen == [0.0, 1.0, 1.0]


def test_fit_sets_the_cosine_schedule_to_the_run_length(rng):
    model = build_dual_encoder("vse", **TINY, **REGIONS)
    model.compile()
    model.fit(tf.data.Dataset.from_tensors(region_batch(rng)).repeat(4), epochs=2, verbose=0)
    schedule = model.optimizer._learning_rate
    assert float(schedule.decay_steps) == 8.0
    steps = np.arange(0, 10)
    expected = model.config.learning_rate * 0.5 * (1 + np.cos(np.pi * np.minimum(steps / 8.0, 1.0)))
    np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-5, atol=1e-9)


def test_scaled_adamw_scales_the_step_and_the_decay_of_matching_variables():
    # variable paths start with their layer's name
    fast_layer, slow_layer = keras.layers.Dense(1, name="tower"), keras.layers.Dense(1, name="text_set_prediction")
    fast_layer.build((None, 3)), slow_layer.build((None, 3))
    variables = [fast_layer.kernel, slow_layer.kernel]
    for v in variables:
        v.assign(np.ones((3, 1), "float32"))
    opt = ScaledAdamW(learning_rate=0.01, weight_decay=0.5, lr_scales={"text_set_prediction": 0.1})
    grad = np.array([[0.3], [-2.0], [0.0]], "float32")
    opt.apply([grad, grad], variables)

    def adamw_step(w, g, lr):  # one AdamW step from zero moments (Keras epsilon 1e-7)
        w = w - w * 0.5 * lr
        m, v = 0.1 * g, 0.001 * g**2
        alpha = lr * np.sqrt(1 - 0.999) / (1 - 0.9)
        return w - alpha * m / (np.sqrt(v) + 1e-7)

    np.testing.assert_allclose(keras.ops.convert_to_numpy(variables[0]), adamw_step(np.ones((3, 1)), grad, 0.01), rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variables[1]), adamw_step(np.ones((3, 1)), grad, 0.001), rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_scaled_adamw_fused_steps_follow_a_numpy_adamw(compiled, rng):
    """Five steps with a cosine schedule, global-norm clipping, decay and a scaled layer, in eager and in a graph
    (where the fused TensorFlow kernels run), against AdamW written out in NumPy."""
    layers = [keras.layers.Dense(4, name="tower"), keras.layers.Dense(2, name="image_set_prediction")]
    for layer in layers:
        layer.build((None, 3))
    variables = [v for layer in layers for v in layer.trainable_variables]
    start = [rng.normal(size=v.shape).astype("float32") for v in variables]
    for v, value in zip(variables, start):
        v.assign(value)
    scales = [1.0, 1.0, 0.1, 0.1]
    opt = ScaledAdamW(learning_rate=CosineDecayPerStep(0.05, decay_steps=6), weight_decay=0.3, global_clipnorm=1.0,
                      lr_scales={"image_set_prediction": 0.1})
    steps = [[rng.normal(size=v.shape).astype("float32") for v in variables] for _ in range(5)]
    apply = tf.function(lambda grads: opt.apply(grads, variables)) if compiled else (lambda g: opt.apply(g, variables))
    for grads in steps:
        apply([tf.constant(g) for g in grads])

    weights = [w.astype("float64") for w in start]
    moments = [np.zeros_like(w) for w in weights]
    velocities = [np.zeros_like(w) for w in weights]
    for t, grads in enumerate(steps, start=1):
        lr = 0.05 * 0.5 * (1 + np.cos(np.pi * min((t - 1) / 6, 1.0)))
        norm = np.sqrt(sum((g.astype("float64") ** 2).sum() for g in grads))
        grads = [g * min(1.0, 1.0 / norm) for g in grads]
        for i, g in enumerate(grads):
            step_lr = lr * scales[i]
            weights[i] = weights[i] - weights[i] * 0.3 * step_lr
            moments[i] = 0.9 * moments[i] + 0.1 * g
            velocities[i] = 0.999 * velocities[i] + 0.001 * g**2
            alpha = step_lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            weights[i] = weights[i] - alpha * moments[i] / (np.sqrt(velocities[i]) + 1e-7)
    for v, expected in zip(variables, weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(v), expected, rtol=1e-4, atol=1e-5, err_msg=v.path)


def _bad_values(kind, low, high):
    """Values outside a FIELD_RANGES entry: wrong types, non-finite numbers, and just beyond each bound."""
    if kind == "bool":
        return [1, 0, "true", None]
    integral = kind.endswith("int")
    bad = ["x", True, float("nan"), float("inf"), [1]] + ([1.5, 2.0] if integral else [])
    step = 1 if integral else 1e-6
    if isinstance(low, str):
        bad.append(float(low.strip("(")))
    elif low is not None:
        bad.append(low - step)
    if isinstance(high, str):
        bad.append(float(high.strip(")")))
    elif high is not None:
        bad.append(high + step)
    return bad


def test_every_config_field_checked_for_type_and_range():
    from tfemde.models.config import FIELD_RANGES

    config = preset("dive")
    assert set(FIELD_RANGES) | {"cnn_filters", "image_input", "pooling", "head", "loss", "reduction", "preset",
                                "backbone", "backbone_weights"} == {f.name for f in dataclasses.fields(config)}
    for field, (kind, low, high) in FIELD_RANGES.items():
        for value in _bad_values(kind, low, high):
            with pytest.raises(ValueError, match=f"^{field} must be .*; got {re.escape(repr(value))}$"):
                preset("dive", **{field: value})
        if kind != "bool" and low is not None and not isinstance(low, str):  # a closed bound is allowed
            assert getattr(preset("dive", **{field: low}), field) == low
    for value in (5, [], [32, 0], [32, 1.5], "32"):
        with pytest.raises(ValueError, match="^cnn_filters must be a non-empty list of positive integers"):
            preset("dive", cnn_filters=value)
    # NumPy scalars are accepted and stored as Python numbers, so the config still writes as JSON
    numpy_config = preset("dive", embed_dim=np.int64(64), alpha=np.float32(8.0), margin=np.float64(0.1))
    assert type(numpy_config.embed_dim) is int and type(numpy_config.alpha) is float
    assert json.loads(json.dumps(numpy_config.to_dict()))["embed_dim"] == 64
    for field, value in (("preset", None), ("backbone", 3), ("backbone_weights", 1.0)):
        with pytest.raises(ValueError, match=f"^{field} must be a string"):
            preset("dive", **{field: value})


def test_a_config_saved_before_a_field_existed_rebuilds_its_own_model(tmp_path):
    """sketch_layer_norm is on by default, but a config.json written before the field existed (without it) must
    give the model it was trained as: the sketch without the token norm."""
    from tfemde.models.config import FIELDS_ADDED_LATER

    assert preset("dive_temde").sketch_layer_norm is True
    saved = preset("dive_temde", **TINY, **REGIONS).to_dict()
    for field in FIELDS_ADDED_LATER:
        del saved[field]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = DualEncoderConfig.load(tmp_path / "config.json")
    assert old.sketch_layer_norm is False
    assert build_dual_encoder(old).get_layer("sketch").layer_norm is False
    assert build_dual_encoder(preset("dive_temde", **TINY, **REGIONS)).get_layer("sketch").layer_norm is True
    # The same for GPO's rank prior (vse_infty): an older config has none.
    saved = preset("vse_infty", **TINY, **REGIONS).to_dict()
    assert saved["gpo_rank_prior"] > 0
    del saved["gpo_rank_prior"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = DualEncoderConfig.load(tmp_path / "config.json")
    assert old.gpo_rank_prior == 0.0
    assert build_dual_encoder(old).get_layer("image_gpo").rank_prior == 0.0
    assert build_dual_encoder(preset("vse_infty", **TINY, **REGIONS)).get_layer("image_gpo").rank_prior > 0


def test_config_json_round_trip_and_errors(tmp_path):
    config = preset("dive", embed_dim=64)
    config.save(tmp_path / "config.json")
    assert DualEncoderConfig.load(tmp_path / "config.json") == config
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown config field"):
        preset("dive", embeddim=3)
    with pytest.raises(ValueError, match="pooling must be one of"):
        preset("vse", pooling="median")
    with pytest.raises(ValueError, match="cnn_blocks must be an integer >= 0; got 1.5"):
        preset("vse", cnn_blocks=1.5)
    with pytest.raises(ValueError, match="image_id"):
        model = build_dual_encoder("vse", **TINY, **REGIONS)
        model.compute_loss(x={"regions": None}, y_pred={})


def test_schedule_survives_serialization():
    schedule = CosineDecayPerStep(0.1, decay_steps=10)
    clone = CosineDecayPerStep.from_config(schedule.get_config())
    assert float(clone(5)) == pytest.approx(float(schedule(5)))


def test_fit_on_a_tf_data_pipeline_does_not_warn_about_shuffle(rng):
    import warnings

    model = build_dual_encoder("vse", **TINY, **REGIONS)
    model.compile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(tf.data.Dataset.from_tensors(region_batch(rng)).repeat(2), epochs=1, verbose=0)
    assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message) for w in caught]


IMAGE_KINDS = {
    "regions": REGIONS,
    "pixels": dict(image_input="pixels", image_size=16, cnn_filters=(4, 8)),
    "backbone": dict(image_input="backbone", backbone="MobileNetV2", image_size=64),  # a 2 x 2 grid
}
# Variables that receive no gradient by design, with the reason; empty today: every weight of every preset learns.
DEAD_BY_DESIGN = {}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_trainable_variable_gets_a_gradient(name, kind, rng):
    """One training step of every preset and image input: each trainable variable gets a non-zero gradient (a
    functional graph that wires one tensor twice, or a branch nothing reads, leaves weights dead)."""
    model = build_dual_encoder(name, **TINY, **IMAGE_KINDS[kind])
    batch = region_batch(rng)
    if kind != "regions":
        size = IMAGE_KINDS[kind]["image_size"]
        batch = {"image": rng.uniform(size=(8, size, size, 3)).astype("float32"),
                 **{k: v for k, v in batch.items() if k not in ("regions", "region_mask")}}
    inputs = {k: v for k, v in batch.items() if k != "image_id"}
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=batch, y_pred=model(inputs, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    dead = [v.path for v, g in zip(model.trainable_variables, gradients)
            if (g is None or not np.any(keras.ops.convert_to_numpy(g))) and v.path not in DEAD_BY_DESIGN]
    assert model.trainable_variables and not dead, f"{name}/{kind}: no gradient reaches {dead}"


def test_the_text_towers_two_gru_states_are_distinct_tensors():
    """The bug behind a dead forward GRU: AveragedBiGRU's output spec gave both states one KerasTensor, so
    `Average([forward, backward])` averaged the backward state with itself."""
    model = build_dual_encoder("dive", **TINY, **REGIONS)
    forward_state, backward_state = model.get_layer("text_global").input
    assert forward_state is not backward_state
    assert forward_state._keras_history.tensor_index != backward_state._keras_history.tensor_index


def test_residual_cnn_blocks_keep_the_grid_and_add_identity_paths(rng):
    """`cnn_blocks` residual blocks per stage: same 8 x 8 grid at 64 px, two more convolutions per block and stage,
    and a block whose second BatchNorm outputs zero passes its input through unchanged (after the ReLU)."""
    plain = build_dual_encoder("vse", **TINY, image_input="pixels", image_size=64, cnn_filters=(4, 8))
    deep = build_dual_encoder("vse", **TINY, image_input="pixels", image_size=64, cnn_filters=(4, 8), cnn_blocks=2)
    convs = lambda m: [l.name for l in m.layers if isinstance(l, keras.layers.Conv2D)]  # noqa: E731
    assert len(convs(deep)) == len(convs(plain)) + 2 * 2 * 2
    assert deep.get_layer("image_grid").output.shape == plain.get_layer("image_grid").output.shape == (None, 256, 8)
    block = keras.Model(deep.get_layer("image_conv0_relu").output, deep.get_layer("image_conv0_block0_relu").output)
    deep.get_layer("image_conv0_block0_b_bn").gamma.assign(np.zeros(4, "float32"))
    deep.get_layer("image_conv0_block0_b_bn").beta.assign(np.zeros(4, "float32"))
    x = np.abs(rng.normal(size=(2, 32, 32, 4))).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x, training=False)), x, atol=1e-6)


def test_set_prediction_learning_rate_scale_defaults_by_image_input():
    """DivE's 0.1x for the set-prediction modules on precomputed regions; 1x when the towers learn from pixels."""
    from tfemde.models.optimization import make_optimizer

    regions, pixels = preset("dive", **REGIONS), preset("dive", image_input="pixels")
    assert regions.resolved_set_lr_scale == 0.1 and pixels.resolved_set_lr_scale == 1.0
    assert make_optimizer(regions).lr_scales == {"image_set_prediction": 0.1, "text_set_prediction": 0.1}
    assert make_optimizer(pixels).lr_scales == {}
    assert make_optimizer(preset("dive", image_input="pixels", set_lr_scale=0.5)).lr_scales == {
        "image_set_prediction": 0.5, "text_set_prediction": 0.5}
    with pytest.raises(ValueError, match="set_lr_scale must be a number > 0; got -1"):
        preset("dive", set_lr_scale=-1)


def test_info_nce_temperature_is_per_unit_of_the_similarity_range(rng, tmp_path):
    """None: 0.05 for a similarity bounded by 1, 0.05 (1 + λ) with the sketch term; a set value wins; the loss
    is NumPy's symmetric InfoNCE at that temperature; a config saved with a number keeps it."""
    from tfemde.models.config import INFO_NCE_TEMPERATURE, DualEncoderConfig

    assert INFO_NCE_TEMPERATURE == 0.05
    assert preset("vse").resolved_info_nce_temperature == 0.05
    assert preset("dive").resolved_info_nce_temperature == 0.05
    assert preset("dive_temde").resolved_info_nce_temperature == pytest.approx(0.075)
    assert preset("temde", sketch_weight=1.0).resolved_info_nce_temperature == pytest.approx(0.1)
    assert preset("dive_temde", info_nce_temperature=0.03).resolved_info_nce_temperature == 0.03
    with pytest.raises(ValueError, match="info_nce_temperature must be a number > 0; got 0"):
        preset("dive_temde", info_nce_temperature=0)
    preset("dive_temde", info_nce_temperature=0.05).save(tmp_path / "config.json")
    assert DualEncoderConfig.load(tmp_path / "config.json").resolved_info_nce_temperature == 0.05

    model = build_dual_encoder("dive_temde", **TINY, **REGIONS, mmd_weight=0.0, diversity_weight=0.0)
    batch = region_batch(rng, batch=5, num_images=4)  # rows 0 and 4 are the same image
    out = encode(model, batch)
    loss = float(model.compute_loss(x=batch, y_pred={k: tf.constant(v) for k, v in out.items()}))
    s = keras.ops.convert_to_numpy(model.similarity({"set": out["image_set"], "sketch": out["image_sketch"]},
                                                    {"set": out["text_set"], "sketch": out["text_sketch"]}))
    logits = s.astype("float64") / 0.075
    positive = batch["image_id"][:, None] == batch["image_id"][None, :]

    def direction(lg, pos):
        return np.mean([np.log(np.exp(row).sum()) - np.log(np.exp(row[p]).sum()) for row, p in zip(lg, pos)])

    assert loss == pytest.approx(0.5 * (direction(logits, positive) + direction(logits.T, positive.T)), rel=1e-4)


def test_set_head_dim_sets_the_width_of_the_set_prediction_projections():
    """None keeps the reference's 2 * D / H per head; an explicit width reaches every projection of both modules."""
    default = build_dual_encoder("dive", **TINY, **REGIONS)
    narrow = build_dual_encoder("dive", **TINY, **REGIONS, set_head_dim=3)
    heads, dim = default.config.set_heads, default.config.embed_dim
    for modality in ("image", "text"):
        block = default.get_layer(f"{modality}_set_prediction").blocks[0]
        assert tuple(block.key_proj.kernel.shape)[1:] == (heads, 2 * dim // heads)
        block = narrow.get_layer(f"{modality}_set_prediction").blocks[0]
        for projection in (block.query_proj, block.key_proj, block.value_proj):
            assert tuple(projection.kernel.shape)[1:] == (heads, 3)
        assert tuple(block.output_proj.kernel.shape) == (heads, 3, dim)


def test_a_mixed_precision_model_changes_no_global_state(tmp_path):
    """Building or loading a mixed_float16 model leaves the process-wide policy alone; its own layers are mixed."""
    assert keras.config.dtype_policy().name == "float32"
    mixed = build_dual_encoder("dive", **TINY, **REGIONS, mixed_precision=True)
    assert keras.config.dtype_policy().name == "float32"
    assert mixed.get_layer("image_fc").dtype_policy.name == "mixed_float16"
    assert mixed.get_layer("image_fc").compute_dtype == "float16"
    save_model(mixed, tmp_path / "mixed.keras")
    loaded = load_model(tmp_path / "mixed.keras")
    assert keras.config.dtype_policy().name == "float32"
    assert loaded.get_layer("image_fc").compute_dtype == "float16"
    plain = build_dual_encoder("dive", **TINY, **REGIONS)
    assert plain.get_layer("image_fc").compute_dtype == "float32"
    outputs = encode(mixed, region_batch(np.random.default_rng(0)))
    assert all(np.isfinite(np.asarray(v)).all() for v in outputs.values())


def test_a_mixed_precision_model_trains_with_loss_scaling(rng):
    """mixed_float16 layers get a LossScaleOptimizer (Keras wraps only models whose own policy is mixed), and a
    few fit steps on CPU give a finite float32 loss that falls, and move every trainable variable."""
    model = build_dual_encoder("dive", **TINY, **REGIONS, mixed_precision=True)
    model.compile()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    batch = region_batch(rng)
    start = [np.array(v.numpy(), copy=True) for v in model.trainable_variables]
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=6, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0], history
    still = [v.path for v, s in zip(model.trainable_variables, start) if np.array_equal(v.numpy(), s)]
    assert not still, f"not trained: {still}"
    plain = build_dual_encoder("dive", **TINY, **REGIONS)
    plain.compile()
    assert not isinstance(plain.optimizer, keras.optimizers.LossScaleOptimizer)
