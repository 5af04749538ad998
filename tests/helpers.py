"""Helpers the test modules share."""

import numpy as np


def to_numpy(value):
    """A tensor, or a dict of them, as NumPy."""
    import keras

    if isinstance(value, dict):
        return {key: keras.ops.convert_to_numpy(v) for key, v in value.items()}
    return keras.ops.convert_to_numpy(value)


def keras_round_trip(model, inputs, path):
    """Save `model` as `.keras` at `path`, load it back, and check that it gives bit-identical outputs on `inputs`.

    Returns:
        the loaded model (for further checks of its layers' configs).
    """
    import keras

    before = to_numpy(model(inputs))
    model.save(path)
    loaded = keras.models.load_model(path)
    after = to_numpy(loaded(inputs))
    if isinstance(before, dict):
        assert sorted(after) == sorted(before)
        for key in before:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    else:
        np.testing.assert_array_equal(after, before)
    return loaded


WORDS = "a red blue green dog cat heart face smiling rocket car on the with small big two three happy sad".split()


def tiny_run(tmp, preset="dive_temde", **overrides):
    """A small untrained model and a tokenizer trained on a few captions (what a run folder holds)."""
    from tfemde.models import build_dual_encoder
    from tfemde.text import Tokenizer

    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(300)]
    tokenizer = Tokenizer.train(captions, vocab_size=40)
    sizes = dict(embed_dim=16, word_dim=8, vocab_size=tokenizer.vocab_size, num_slots=2, set_depth=1, set_heads=2,
                 sketch_depth=2, sketch_bits=3, image_size=64, cnn_filters=(4, 8), max_length=12)
    sizes.update(overrides)
    return build_dual_encoder(preset, **sizes), tokenizer
