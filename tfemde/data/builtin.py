"""The built-in emoji data set: Noto Color Emoji artwork with CLDR and `emoji`-package names as captions.

The file (`tfemde/data/builtin/emoji.npz`, made by `tfemde.data.build_emoji`) is a plain `.npz` without pickles:

| key            | dtype / shape          | what                                                                  |
| -------------- | ---------------------- | --------------------------------------------------------------------- |
| `format`       | str scalar             | `"tfemde-emoji-v1"`                                                   |
| `size`         | int scalar             | image side S in pixels                                                |
| `names`        | str `[N]`              | the emoji characters                                                  |
| `group_keys`   | str `[N]`              | the emoji with skin-tone modifiers and U+FE0F removed                 |
| `indices`      | uint8 `[N, S, S]`      | palette index per pixel (palette images; the shipped file)            |
| `palettes`     | uint8 `[N, P, 3]`      | each image's RGB palette, P <= 256 (image i = `palettes[i][indices[i]]`) |
| `pixels`       | uint8 `[N, S, S, 3]`   | RGB pixels (lossless files, instead of `indices` and `palettes`)      |
| `captions`     | str `[M]`              | captions                                                              |
| `caption_item` | int32 `[M]`            | the image of each caption                                             |
| `langs`, `sources` | str `[L]`, str `[K]` | caption languages; provenance (font, CLDR and `emoji` versions)       |

The arrays are deflate-compressed (`np.savez_compressed`); a palette image is what an 8-bit palette PNG holds, kept
as arrays so that loading is one inflate and one gather (no per-image decoder calls).

Groups and splits are not stored: they are derived from `group_keys` by `group_ids` / `group_splits`, so skin-tone
variants of one emoji share a group and never cross splits.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from tfemde.data.common import stable_hash
from tfemde.data.dataset import Dataset

FORMAT = "tfemde-emoji-v1"
STYLE_FORMAT = "tfemde-emoji-style-v1"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
EMOJI_PATH = BUILTIN_DIR / "emoji.npz"
# The styles of the built-in set: Noto (the main file, with the captions) and the images-only style files.
STYLES = ("noto", "twemoji")
STYLE_PATHS = {"twemoji": BUILTIN_DIR / "emoji_twemoji.npz"}
SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}
_KEYS = ("format", "size", "names", "group_keys", "captions", "caption_item")

_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_cache = {}
_cache_lock = threading.Lock()


def group_key(emoji_text: str) -> str:
    """The concept an emoji belongs to: the emoji without skin-tone modifiers (U+1F3FB..U+1F3FF) and U+FE0F."""
    key = "".join(ch for ch in emoji_text if ch not in _SKIN_TONES and ch != "\ufe0f")
    return key or emoji_text


def group_ids(keys) -> np.ndarray:
    """`[N]` int64 stable group ids (a 63-bit BLAKE2b hash of each group key)."""
    return np.array([stable_hash(k, b"tfemde-group") for k in keys], dtype=np.int64)


def group_splits(keys) -> np.ndarray:
    """`[N]` str split per key, 80/10/10 train/val/test by a hash of the key (same key, same split)."""
    bucket = np.array([stable_hash(k, b"tfemde-split") % 100 for k in keys], dtype=np.int64)
    train, val = SPLIT_PERCENT["train"], SPLIT_PERCENT["train"] + SPLIT_PERCENT["val"]
    return np.where(bucket < train, "train", np.where(bucket < val, "val", "test"))


def _images(path, z, n, size) -> np.ndarray:
    """`[N, S, S, 3]` uint8 RGB from `pixels`, or from `indices` and `palettes` (gathered in chunks)."""
    if "pixels" in z.files:
        images = z["pixels"]
        if images.dtype != np.uint8 or images.shape != (n, size, size, 3):
            raise ValueError(f"{path}: pixels must be uint8 with shape {(n, size, size, 3)}; "
                             f"got {images.dtype} with shape {images.shape}")
        return images
    if "indices" not in z.files or "palettes" not in z.files:
        raise ValueError(f"{path}: not an emoji data file; it needs 'pixels' or 'indices' and 'palettes'")
    indices, palettes = z["indices"], z["palettes"]
    if indices.dtype != np.uint8 or indices.shape != (n, size, size):
        raise ValueError(f"{path}: indices must be uint8 with shape {(n, size, size)}; "
                         f"got {indices.dtype} with shape {indices.shape}")
    if palettes.dtype != np.uint8 or palettes.ndim != 3 or palettes.shape[0] != n or palettes.shape[2] != 3 \
            or not 1 <= palettes.shape[1] <= 256:
        raise ValueError(f"{path}: palettes must be uint8 with shape [{n}, <=256, 3]; "
                         f"got {palettes.dtype} with shape {palettes.shape}")
    if indices.max(initial=0) >= palettes.shape[1]:
        raise ValueError(f"{path}: indices must be < {palettes.shape[1]} (the palette size); "
                         f"got {int(indices.max())}")
    # One uint32 per palette entry makes the gather move whole pixels; chunks keep the temporaries in cache.
    rgba = np.zeros(palettes.shape[:2] + (4,), dtype=np.uint8)
    rgba[..., :3] = palettes
    words = rgba.view(np.uint32).reshape(-1)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    chunk = max(1, 2**20 // (size * size))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        flat = indices[start:stop].astype(np.intp)
        flat += (np.arange(start, stop, dtype=np.intp) * palettes.shape[1])[:, None, None]
        images[start:stop] = np.take(words, flat).view(np.uint8).reshape(stop - start, size, size, 4)[..., :3]
    return images


def _open_npz(path, keys, what):
    """The open `.npz` at `path` (no pickles), refused with one line when unreadable or missing one of `keys`."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    missing = [k for k in keys if k not in z.files]
    if missing:
        z.close()
        raise ValueError(f"{path}: not an {what}; missing entries {missing}")
    return z


def _cached(path, kind, read):
    """`read()`'s dict of arrays for the file at `path`, read once per process and version of the file; the
    arrays are read-only (they are shared by every Dataset made from them)."""
    stat = path.stat()
    key = (kind, str(path), stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is None:
        cached = read()
        for value in cached.values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
        with _cache_lock:
            _cache[key] = cached
    return cached


def read_emoji_file(path=None, name: str = "emoji") -> Dataset:
    """Read an emoji `.npz` (the shipped one by default) into a `Dataset` with images `[N, S, S, 3]` uint8.

    Decoded files are cached per process (the image array is shared and read-only).

    Args:
        path: the `.npz` file; None for the shipped `tfemde/data/builtin/emoji.npz`.
        name: the `Dataset` name.

    Returns:
        A `Dataset` with all three splits.

    Example:
        >>> ds = read_emoji_file()
        >>> ds.images.shape[1:]
        (64, 64, 3)
    """
    path = Path(path) if path is not None else EMOJI_PATH
    if not path.is_file():
        hint = " (the shipped data file is missing: rebuild it with `tfemde data build-emoji`)" \
            if path == EMOJI_PATH else ""
        raise FileNotFoundError(f"emoji data file {path} not found{hint}")

    def read():
        with _open_npz(path, _KEYS, "emoji data file") as z:
            if str(z["format"]) != FORMAT:
                raise ValueError(f"{path}: format must be {FORMAT!r}; got {str(z['format'])!r}")
            arrays = {k: z[k] for k in _KEYS}
            size, n = int(arrays["size"]), len(arrays["names"])
            if len(arrays["group_keys"]) != n:
                raise ValueError(f"{path}: group_keys must have length {n} like names; "
                                 f"got {len(arrays['group_keys'])}")
            images = _images(path, z, n, size)
        keys = [str(k) for k in arrays["group_keys"]]
        return dict(images=images, names=arrays["names"].astype(str), captions=arrays["captions"].tolist(),
                    caption_item=arrays["caption_item"].astype(np.int64), item_group=group_ids(keys),
                    item_split=group_splits(keys))

    cached = _cached(path, "emoji", read)
    return Dataset(name=name, captions=list(cached["captions"]), caption_item=cached["caption_item"],
                   item_split=cached["item_split"], item_group=cached["item_group"], images=cached["images"],
                   item_names=cached["names"])


def read_style_file(style: str, path=None):
    """`(names [N'] str, images [N', S, S, 3] uint8)` of an images-only style file (`build_twemoji` writes one).

    Args:
        style: a style of `STYLES` other than `"noto"`.
        path: the `.npz`; None for the shipped one.
    """
    if style not in STYLE_PATHS:
        raise ValueError(f"style must be one of {', '.join(STYLE_PATHS)} (a file of images only); got {style!r}")
    path = Path(path) if path is not None else STYLE_PATHS[style]
    if not path.is_file():
        raise FileNotFoundError(f"emoji style file {path} not found (rebuild it with "
                                f"`tfemde data build-emoji {path} --style {style}`)")

    def read():
        with _open_npz(path, ("format", "style", "size", "names"), "emoji style file") as z:
            if str(z["format"]) != STYLE_FORMAT or str(z["style"]) != style:
                raise ValueError(f"{path}: format must be {STYLE_FORMAT!r} of style {style!r}; got "
                                 f"{str(z['format'])!r} of style {str(z['style'])!r}")
            names = z["names"].astype(str)
            return {"names": names, "images": _images(path, z, len(names), int(z["size"]))}

    cached = _cached(path, "style", read)
    return cached["names"], cached["images"]


def read_emoji_styles(styles=("noto",), name: str = "emoji") -> Dataset:
    """The built-in emoji set in one or more styles: every emoji a style draws is one item of that style.

    An item of another style has the captions, group and split of the same emoji in the Noto set, so the styles of
    a concept share its group and never cross splits, and text-to-image retrieval counts every style's image of a
    caption as a match. `item_styles` says which style each item is (image-to-image retrieval across styles).

    Args:
        styles: a sequence of `STYLES` (without repeats), e.g. `("noto", "twemoji")`; items come in this order.
        name: the `Dataset` name.

    Example:
        >>> ds = read_emoji_styles(("noto", "twemoji"))
        >>> sorted(set(ds.item_styles.tolist()))
        ['noto', 'twemoji']
    """
    styles = (styles,) if isinstance(styles, str) else tuple(styles)
    bad = [s for s in styles if s not in STYLES]
    if not styles or bad or len(set(styles)) != len(styles):
        raise ValueError(f"styles must be distinct names of {', '.join(STYLES)}; got {styles!r}")
    base = read_emoji_file(name=name)
    index = {str(e): i for i, e in enumerate(base.item_names)}
    items, images, item_styles = [], [], []
    for style in styles:
        if style == "noto":
            rows, pixels = np.arange(base.num_items), base.images
        else:
            names, pixels = read_style_file(style)
            if pixels.shape[1:] != base.images.shape[1:]:
                raise ValueError(f"style {style!r} images must have shape {base.images.shape[1:]} like the Noto set; "
                                 f"got {pixels.shape[1:]}")
            unknown = [str(e) for e in names if str(e) not in index]
            if unknown:
                raise ValueError(f"style {style!r} has emoji that the Noto set lacks, e.g. {unknown[0]!r}")
            rows = np.array([index[str(e)] for e in names], dtype=np.int64)
        items.append(rows)
        images.append(pixels)
        item_styles.extend([style] * len(rows))
    rows = np.concatenate(items)
    # every item takes the captions of its emoji in the Noto set, in item order
    order = np.argsort(base.caption_item, kind="stable")
    starts = np.searchsorted(base.caption_item[order], np.arange(base.num_items + 1))
    captions, caption_item = [], []
    for item, row in enumerate(rows):
        for c in order[starts[row]:starts[row + 1]]:
            captions.append(base.captions[c])
            caption_item.append(item)
    return Dataset(name=name, captions=captions, caption_item=np.array(caption_item, dtype=np.int64),
                   item_split=base.item_split[rows], item_group=base.item_group[rows],
                   images=np.concatenate(images) if len(images) > 1 else images[0],
                   item_names=np.asarray(base.item_names)[rows], item_styles=np.array(item_styles, dtype=str))
