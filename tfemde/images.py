"""Image files to model input: the one decoder of training (`tfemde.data`) and serving (`tfemde.serving`).

Pillow and NumPy only (no TensorFlow), so the TF-free serving runtime and the tf.data pipelines (through
`tf.numpy_function`) decode every file with the same code. The rules:

* the first frame of the file (GIF, APNG, multi-page TIFF);
* 16- and 32-bit grey (`I;16*`, `I`) and float (`F`) images are scaled to 0-255 (`v / 257` for 16-bit, so 65535 is
  255; 32-bit integers are taken as 16-bit; floats are clipped to [0, 1] and scaled by 255); Pillow itself brings
  16-bit colour PNGs down to 8 bits;
* any transparency (RGBA, LA, PA, a palette or grey image with a transparent colour, WebP alpha) is composited over
  white in float: `rgb * a + 255 * (1 - a)` with `a = alpha / 255`; everything else (grey, palette, CMYK, YCbCr) is
  converted to RGB by Pillow;
* an image of another size is squashed (aspect ratio not kept) to the model's size with bilinear interpolation
  (antialiased when downsampling) on float channels, then rounded half to even and clipped to uint8;
* at most `max_pixels` pixels are decoded: a JPEG over twice the model's size is decoded at a reduced DCT scale
  (Pillow's `draft`, 1/2 to 1/8, never below twice the model's size) and then resized as above; any other image over
  the limit is refused with a `ValueError` naming the file, its size and the limit (a decompression bomb never
  reaches memory).
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np

# 40 megapixels (e.g. 8000 x 5000): a full-size camera photo is fine, a 14000 x 14000 bomb is refused before decoding.
MAX_PIXELS = 40_000_000


def size_pair(size) -> Tuple[int, int]:
    """`(height, width)` of an int (square) or a pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(s) for s in size)
    return height, width


def _check_pixels(path, image, max_pixels):
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"image file {path!r} is {width} x {height} = {width * height:,} pixels, more than the "
                         f"limit of {max_pixels:,} (a decompression bomb, or pass a larger max_pixels)")


def _high_depth_to_float(image) -> np.ndarray:
    """`[H, W]` float32 in 0-255 of a 16/32-bit integer or float grey image."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        return (np.clip(values, 0.0, 1.0) * 255.0).astype(np.float32)
    return (np.clip(values, 0.0, 65535.0) / 257.0).astype(np.float32)


def _has_alpha(image) -> bool:
    return "A" in image.getbands() or "transparency" in image.info


def decode_image(path, size, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read one image file and preprocess it as the model takes it (see the module docstring for the rules).

    Args:
        path: an image file in any format Pillow reads (PNG, JPEG, GIF, BMP, WebP, TIFF, ...).
        size: the model's image size, an int (square) or `(height, width)`.
        max_pixels: the most pixels decoded (JPEGs are decoded at a reduced scale instead when they can).

    Returns:
        `[H, W, 3]` uint8.

    Raises:
        ValueError: naming the file when it does not exist, is not an image Pillow can read, or is too large.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "red.png")
        >>> Image.new("RGBA", (10, 10), (255, 0, 0, 255)).save(path)
        >>> decode_image(path, 4).shape
        (4, 4, 3)
    """
    from PIL import Image, UnidentifiedImageError

    height, width = size_pair(size)
    path = os.fsdecode(path)
    try:
        with Image.open(path) as image:
            image.seek(0)
            if image.format == "JPEG" and image.size[0] * image.size[1] > 4 * width * height:
                # The smallest DCT scale that keeps twice the model's size, then the same antialiased resize.
                image.draft(image.mode if image.mode in ("L", "CMYK") else "RGB", (2 * width, 2 * height))
            _check_pixels(path, image, max_pixels)
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                pixels = np.repeat(_high_depth_to_float(image)[..., None], 3, axis=-1)
            elif _has_alpha(image):
                rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
                alpha = rgba[..., 3:] / np.float32(255.0)
                pixels = rgba[..., :3] * alpha + np.float32(255.0) * (np.float32(1.0) - alpha)
            else:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise ValueError(f"image file {path!r} does not exist") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"image file {path!r} is too large to decode safely: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as error:
        raise ValueError(f"image file {path!r} is not an image Pillow can read: {error}") from None
    if pixels.shape[:2] != (height, width):
        pixels = np.stack([
            np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="F").resize(
                (width, height), resample=Image.BILINEAR), dtype=np.float32)
            for c in range(3)], axis=-1)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def image_problem(path, max_pixels: int = MAX_PIXELS):
    """None when `decode_image` can read the file's header within `max_pixels`, else why not (one line)."""
    from PIL import Image

    path = os.fsdecode(path)
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as image:  # reads the header only
            if image.format != "JPEG":
                _check_pixels(path, image, max_pixels)
    except ValueError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for a file it cannot read
        return f"not a readable image ({type(error).__name__}: {error})"
    return None
