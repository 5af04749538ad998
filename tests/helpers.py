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
