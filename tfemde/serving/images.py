"""Image files to model input with Pillow, following the training pipeline's preprocessing (no TensorFlow).

The rules are those of `tfemde.data.pipelines.decode_image_file`: PNG transparency is composited over white (in
float, `rgb·a + 255·(1 − a)` with `a = alpha / 255`); other formats (JPEG, GIF's first frame, BMP, ...) are
converted to RGB; an image of another size is squashed (aspect ratio not kept) to the model's size with bilinear
interpolation that is antialiased when downsampling, in float; the result is rounded half to even and clipped to
uint8. The model then sees `uint8 / 255` as float32 in [0, 1].

The resize runs on float32 channels (Pillow's mode "F"), as TensorFlow resizes float images, so no intermediate
rounding happens. What remains different from `tf.image.resize(antialias=True)` is the order of the float
arithmetic: it moves a few pixels by one uint8 level (see `tests/test_serving.py` for the measured difference),
and not at all when no resize is needed.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np

_PNG_MAGIC = b"\x89PNG"


def _size_pair(size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(s) for s in size)
    return height, width


def load_image(path, size) -> np.ndarray:
    """Read one image file and preprocess it like the training pipeline.

    Args:
        path: an image file (PNG, JPEG, GIF, BMP, or anything else Pillow reads).
        size: the model's image size, an int (square) or `(height, width)`.

    Returns:
        `[H, W, 3]` uint8.

    Raises:
        ValueError: naming the file when it does not exist or is not an image Pillow can read.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "red.png")
        >>> Image.new("RGBA", (10, 10), (255, 0, 0, 255)).save(path)
        >>> load_image(path, 4).shape
        (4, 4, 3)
    """
    from PIL import Image, UnidentifiedImageError

    height, width = _size_pair(size)
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            is_png = f.read(4) == _PNG_MAGIC
        with Image.open(path) as image:
            image.seek(0)
            if is_png:
                rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
                alpha = rgba[..., 3:] / np.float32(255.0)
                pixels = rgba[..., :3] * alpha + np.float32(255.0) * (np.float32(1.0) - alpha)
            else:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise ValueError(f"image file {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image file {path!r} is not an image Pillow can read: {error}") from None
    if pixels.shape[:2] != (height, width):
        pixels = np.stack([
            np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="F").resize(
                (width, height), resample=Image.BILINEAR), dtype=np.float32)
            for c in range(3)], axis=-1)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def load_images(paths: Sequence, size) -> np.ndarray:
    """`load_image` for every path: `[N, H, W, 3]` uint8."""
    height, width = _size_pair(size)
    out = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = load_image(path, (height, width))
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
