"""`load`: one entry point for every data source (built-in emoji, Karpathy JSON, precomp regions, JSONL).

Every reader returns a `tfemde.data.Dataset`. Bad input raises an error that names the file and what is wrong;
nothing is dropped silently: the only items a reader skips are those whose image file is missing or unreadable, and
those are counted in one `DataWarning` (or raise with `strict=True`).
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from tfemde.data.common import SPLIT_NAMES, DataWarning, check_split, read_text, stable_ids
from tfemde.data.dataset import Dataset

def _image_problem(path: str, check: bool) -> Optional[str]:
    if not check:
        return None if os.path.isfile(path) else "missing"
    from tfemde.images import image_problem

    return image_problem(path)


def filter_images(paths, source, strict: bool, check: bool = True) -> np.ndarray:
    """`[N]` bool: which image files exist and (with `check`) open as a decodable image.

    Missing or unreadable files are counted in one `DataWarning`; with `strict` the first one raises
    (`FileNotFoundError` for a missing file, `ValueError` otherwise), naming the file, and so does a list in which
    no image is usable (a wrong image root, most likely).
    """
    paths = list(paths)
    if len(paths) > 64:
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = list(pool.map(lambda p: _image_problem(p, check), paths, chunksize=64))
    else:
        problems = [_image_problem(p, check) for p in paths]
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if bad and strict:
        path, why = bad[0]
        error = FileNotFoundError if why == "missing" else ValueError
        raise error(f"{source}: image {path} is {why} ({len(bad)} of {len(paths)} images have problems; "
                    f"strict=False skips them)")
    if bad and len(bad) == len(paths):
        path, why = bad[0]
        error, hint = (FileNotFoundError, "; is image_root right?") if why == "missing" else (ValueError, "")
        raise error(f"{source}: all {len(paths)} images are missing or unreadable, e.g. {path} ({why}){hint}")
    if bad:
        examples = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        warnings.warn(f"{source}: skipped {len(bad)} of {len(paths)} items whose image is missing or unreadable, "
                      f"e.g. {examples}", DataWarning, stacklevel=3)
    return np.array([why is None for why in problems], dtype=bool)


def _image_dataset(name, source, records, split, strict, check) -> Dataset:
    """A Dataset of image files from `records`: dicts with path, captions, split, group key and display name."""
    if split is not None:
        present = sorted({r["split"] for r in records})
        records = [r for r in records if r["split"] == split]
        if not records:
            raise ValueError(f"{source}: no items in split {split!r}; the file has splits {present}")
    keep = filter_images([r["path"] for r in records], source, strict, check)
    records = [r for r, ok in zip(records, keep) if ok]
    captions, caption_item = [], []
    for i, r in enumerate(records):
        captions.extend(r["captions"])
        caption_item.extend([i] * len(r["captions"]))
    return Dataset(name=name, captions=captions, caption_item=np.array(caption_item, dtype=np.int64),
                   item_split=np.array([r["split"] for r in records], dtype=str),
                   item_group=stable_ids([r["group"] for r in records], b"tfemde-group"),
                   image_paths=np.array([r["path"] for r in records], dtype=str),
                   item_names=np.array([r["name"] for r in records], dtype=str))


def _captions(path, where, value) -> list:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: {where}: captions must be a non-empty list of strings; got {value!r:.80}")
    for c in value:
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{path}: {where}: every caption must be a non-empty string; got {c!r:.80}")
    return [" ".join(c.split()) for c in value]


def read_karpathy(path, split=None, strict: bool = False, image_root=None, check_images: bool = True) -> Dataset:
    """Read a Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`, ...) and its image folder.

    Captions are `sentences[].raw` (whitespace normalised; the joined `tokens` where `raw` is absent), `restval`
    counts as train, and an image's path is `image_root / filepath / filename`. Images stay files (`image_paths`),
    decoded later in tf.data; items with the same path share a group.

    Args:
        path: the JSON file.
        split: None for all splits, or `"train"` (with restval), `"val"`, `"test"`.
        strict: raise on the first missing or unreadable image instead of skipping it with a warning.
        image_root: the image folder; default the JSON file's folder.
        check_images: open each image's header (in threads) to catch unreadable files; False checks existence only.

    Returns:
        A `Dataset` of kind `"image_files"`.

    Example:
        >>> import json, tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "pics").mkdir()
        >>> Image.new("RGB", (8, 8), "red").save(folder / "pics" / "red.png")
        >>> images = [{"filepath": "pics", "filename": "red.png", "split": "train",
        ...            "sentences": [{"raw": "a red square"}, {"raw": "red"}]}]
        >>> _ = (folder / "dataset.json").write_text(json.dumps({"images": images}))
        >>> ds = read_karpathy(folder / "dataset.json")
        >>> ds.kind, ds.num_items, ds.captions
        ('image_files', 1, ['a red square', 'red'])
    """
    path = Path(path)
    split = check_split(split)
    try:
        data = json.loads(read_text(path, "Karpathy split JSON"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: a Karpathy split JSON must be an object with an 'images' list; "
                         f"got {type(data).__name__}" + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict)
                                                          else ""))
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for j, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str) or not image["filename"]:
            raise ValueError(f"{path}: images[{j}] must be an object with a 'filename' string; got {image!r:.80}")
        relative = os.path.join(str(image.get("filepath") or ""), image["filename"])
        where = f"images[{j}] ({relative})"
        if image.get("split") not in ("train", "restval", "val", "test"):
            raise ValueError(f"{path}: {where}: split must be one of 'train', 'restval', 'val', 'test'; "
                             f"got {image.get('split')!r}")
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{path}: {where}: sentences must be a non-empty list; got {sentences!r:.80}")
        raw = []
        for k, s in enumerate(sentences):
            text = s.get("raw") if isinstance(s, dict) else None
            if text is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                text = " ".join(map(str, s["tokens"]))
            if not isinstance(text, str):
                raise ValueError(f"{path}: {where}: sentences[{k}] needs a 'raw' string; got {s!r:.80}")
            raw.append(text)
        records.append(dict(path=str(root / relative), name=relative, split=SPLIT_NAMES[image["split"]],
                            group="path:" + os.path.normpath(relative),
                            captions=_captions(path, f"{where} sentences", raw)))
    return _image_dataset(path.stem, path, records, split, strict, check_images)


def read_jsonl(path, split=None, strict: bool = False, image_root=None, check_images: bool = True) -> Dataset:
    """Read a JSONL file of `{"image": path, "captions": [...], "split": ..., "group"?: ...}`, one image a line.

    Image paths are relative to the file's folder (or `image_root`); `split` is train, val or test (`restval` and
    `dev` are accepted for train and val); items with equal `group` (any JSON value) are matches in evaluation,
    and without `group` items with the same image path share one. Blank lines are ignored.

    Args:
        path: the `.jsonl` file.
        split: None for all splits, or `"train"`, `"val"`, `"test"`.
        strict: raise on the first missing or unreadable image instead of skipping it with a warning.
        image_root: the folder image paths are relative to; default the file's folder.
        check_images: open each image's header to catch unreadable files; False checks existence only.

    Returns:
        A `Dataset` of kind `"image_files"`.

    Example:
        >>> import json, tempfile
        >>> from PIL import Image
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name, colour in (("cat.png", "black"), ("dog.png", "white")):
        ...     Image.new("RGB", (8, 8), colour).save(folder / name)
        >>> lines = [{"image": "cat.png", "captions": ["a cat"], "split": "train"},
        ...          {"image": "dog.png", "captions": ["a dog", "a puppy"], "split": "val", "group": "dogs"}]
        >>> _ = (folder / "pairs.jsonl").write_text("\\n".join(json.dumps(line) for line in lines))
        >>> ds = read_jsonl(folder / "pairs.jsonl", split="val")
        >>> ds.num_items, ds.captions
        (1, ['a dog', 'a puppy'])
    """
    path = Path(path)
    split = check_split(split)
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    for number, line in enumerate(read_text(path, "JSONL file").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {where} is not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: {where} must be a JSON object; got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"image", "captions", "split", "group"})
        if unknown:
            raise ValueError(f"{path}: {where}: unknown keys {unknown}; expected image, captions, split, group")
        if not isinstance(obj.get("image"), str) or not obj["image"]:
            raise ValueError(f"{path}: {where}: 'image' must be a non-empty path string; got {obj.get('image')!r}")
        if obj.get("split") not in SPLIT_NAMES:
            raise ValueError(f"{path}: {where}: split must be one of 'train', 'val', 'test' (or 'restval', 'dev'); "
                             f"got {obj.get('split')!r}")
        group = obj.get("group")
        if isinstance(group, (dict, list)):
            raise ValueError(f"{path}: {where}: group must be a string or number; got {group!r:.80}")
        records.append(dict(path=str(root / obj["image"]), name=obj["image"], split=SPLIT_NAMES[obj["split"]],
                            group=("path:" + os.path.normpath(obj["image"])) if group is None
                            else "group:" + json.dumps(group),
                            captions=_captions(path, where, obj.get("captions"))))
    if not records:
        raise ValueError(f"{path}: no items; expected one JSON object per line")
    return _image_dataset(path.stem, path, records, split, strict, check_images)


def load(source, split=None, strict: bool = False, image_root=None, check_images: bool = True,
         captions_per_image: int = 5, styles=None) -> Dataset:
    """Load a data set of images (or region features) and captions as a `tfemde.data.Dataset`.

    `source` is one of:
    - `"emoji"`: the built-in emoji set (Noto Color Emoji art, CLDR and `emoji`-package names; 64x64 RGB on white,
      ~2.3 captions per image, skin-tone variants grouped, 80/10/10 by group), or an `.npz` made by `build_emoji`;
    - a Karpathy split JSON (`dataset_coco.json`, ...) with its images under `image_root` (default: its folder);
    - a SCAN/VSE precomp folder (`{split}_ims.npy` `[N, R, F]`, `{split}_caps.txt`, optional `{split}_ids.txt`),
      read through memory maps (see `tfemde.data.precomp.read_precomp`);
    - a `.jsonl` file of `{"image", "captions", "split", "group"?}` objects.

    Args:
        source: `"emoji"` or a path (see above).
        split: None for all splits, or `"train"`, `"val"`, `"test"` (precomp folders also take the file names
            `"dev"` and `"testall"`).
        strict: raise on the first missing or unreadable image instead of skipping it with a `DataWarning`.
        image_root: the image folder of a Karpathy JSON or JSONL file.
        check_images: open each image file's header (Karpathy, JSONL); False only checks that the files exist.
        captions_per_image: captions per image in precomp folders.
        styles: the built-in set only: its art styles, e.g. `("noto", "twemoji")` (None: Noto alone). Each style's
            image of an emoji is one item with the emoji's captions, group and split; `item_styles` names them.

    Returns:
        A `Dataset`: kind `"images"` (emoji), `"image_files"` (Karpathy, JSONL) or `"regions"` (precomp).

    Example:
        >>> ds = load("emoji", split="val")
        >>> ds.images.dtype, ds.images.shape[1:]
        (dtype('uint8'), (64, 64, 3))
    """
    path = Path(source)
    if source == "emoji" and not path.exists():
        from tfemde.data.builtin import read_emoji_file

        from tfemde.data.builtin import read_emoji_styles

        check_split(split)
        _no_image_root(image_root, "the built-in emoji set")
        ds = read_emoji_file() if styles is None else read_emoji_styles(styles)
        return ds if split is None else ds.split(split)
    if styles is not None:
        raise ValueError(f"styles applies to the built-in emoji set (source 'emoji') only; got source {str(source)!r}")
    if not path.exists():
        raise FileNotFoundError(f"data source {str(source)!r} not found; expected 'emoji', a Karpathy split JSON "
                                f"file, a precomp folder ({{split}}_ims.npy + {{split}}_caps.txt) or a .jsonl file")
    if path.is_dir():
        from tfemde.data.precomp import read_precomp

        _no_image_root(image_root, "precomp region features")
        return read_precomp(path, split=split, captions_per_image=captions_per_image)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, split=split, strict=strict, image_root=image_root, check_images=check_images)
    if suffix == ".json":
        return read_karpathy(path, split=split, strict=strict, image_root=image_root, check_images=check_images)
    if suffix == ".npz":
        from tfemde.data.builtin import read_emoji_file

        check_split(split)
        _no_image_root(image_root, "emoji .npz files")
        ds = read_emoji_file(path, name=path.stem)
        return ds if split is None else ds.split(split)
    raise ValueError(f"{path}: unknown data source type {suffix or '(no suffix)'!r}; expected a Karpathy .json, "
                     f"a .jsonl, an emoji .npz or a precomp folder")


def _no_image_root(image_root, what):
    if image_root is not None:
        raise ValueError(f"image_root applies to Karpathy JSON and JSONL sources only, not {what}; "
                         f"got image_root={str(image_root)!r}")
