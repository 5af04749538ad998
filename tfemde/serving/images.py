"""Image files to model input, TensorFlow-free: `tfemde.images.decode_image`, the decoder training uses too.

See `tfemde.images` for the rules (first frame, bit depth, transparency over white, antialiased bilinear squash to the
model's size, a pixel limit against decompression bombs). Training (`tfemde.data`) runs the same function inside
tf.data, so a file gives the same pixels in training and in serving, bit for bit.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tfemde.images import MAX_PIXELS, decode_image, size_pair


def load_image(path, size, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read one image file and preprocess it like the training pipeline: `[H, W, 3]` uint8.

    Args:
        path: an image file in any format Pillow reads.
        size: the model's image size, an int (square) or `(height, width)`.
        max_pixels: the most pixels decoded (see `tfemde.images.decode_image`).

    Raises:
        ValueError: naming the file when it does not exist, is not an image Pillow can read, or is too large.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "half.png")
        >>> Image.new("LA", (12, 8), (0, 128)).save(path)  # black at half opacity: grey over white
        >>> pixels = load_image(path, (4, 6))
        >>> pixels.shape, int(pixels[0, 0, 0])
        ((4, 6, 3), 127)
    """
    return decode_image(path, size, max_pixels=max_pixels)


def load_images(paths: Sequence, size, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`load_image` for every path: `[N, H, W, 3]` uint8."""
    height, width = size_pair(size)
    out = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = load_image(path, (height, width), max_pixels=max_pixels)
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder) -> list:
    """The image files (by suffix) directly in `folder`, sorted by name, as paths."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} does not exist")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ValueError(f"image folder {folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(folder, n) for n in names]
