"""Activations that convert cleanly to ONNX."""

import math

import keras
from keras import ops

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@keras.saving.register_keras_serializable(package="tfemde")
def gelu_erf(x):
    """Exact GELU written with `erf`: `0.5 * x * (1 + erf(x / sqrt(2)))`.

    Numerically the same as PyTorch's `nn.GELU()` (the DivE feed-forward activation). Keras'
    exact `"gelu"` lowers to TensorFlow's `Gelu`/`Erfc`, which tf2onnx cannot convert; this form
    lowers to ONNX `Erf`.

    Args:
        x: a float tensor of any shape.

    Returns:
        A tensor of the same shape and dtype as `x`.

    Example:
        >>> import numpy as np
        >>> y = gelu_erf(np.array([-1.0, 0.0, 1.0], "float32"))
        >>> [round(float(v), 4) for v in y]
        [-0.1587, 0.0, 0.8413]
    """
    x = ops.convert_to_tensor(x)
    return 0.5 * x * (1.0 + ops.erf(x * ops.cast(_INV_SQRT2, x.dtype)))
