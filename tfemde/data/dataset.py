"""The one data-set type every reader returns: items, their captions, splits and groups."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Items (images, image files or region features) with their captions, split and group.

    Exactly one of `images`, `image_paths` or `regions` holds the items. Items in the same group count as matches
    in evaluation (skin-tone variants of one emoji, repeated images); a data set without groups gives every item
    its own group.

    Attributes:
        name: a short name for messages, e.g. `"emoji"`.
        captions: `[M]` caption strings.
        caption_item: `[M]` int64, the item index of each caption.
        item_split: `[N]` str, `"train"`, `"val"` or `"test"` per item (`restval` is already mapped to train).
        item_group: `[N]` int64 group id per item.
        images: `[N, H, W, 3]` uint8 pixels, or None.
        image_paths: `[N]` str paths of image files (decoded in `tf.data`), or None.
        regions: `[R_rows, R, F]` float32 region features, usually a read-only memory map, or None.
        region_rows: `[N]` int64, the row of `regions` that holds each item (lets subsets share one memory map and
            lets readers de-duplicate releases whose image rows repeat). None means row i for item i.
        item_names: `[N]` str names for display (file name, emoji character), or None.
        item_styles: `[N]` str domain of each item (the emoji set's `"noto"` / `"twemoji"`; street / shop photos),
            for image-to-image retrieval across domains, or None.
    """

    name: str
    captions: Sequence[str]
    caption_item: np.ndarray
    item_split: np.ndarray
    item_group: np.ndarray
    images: Optional[np.ndarray] = None
    image_paths: Optional[np.ndarray] = None
    regions: Optional[np.ndarray] = None
    region_rows: Optional[np.ndarray] = None
    item_names: Optional[np.ndarray] = None
    item_styles: Optional[np.ndarray] = None

    def __post_init__(self):
        holders = [f for f in ("images", "image_paths", "regions") if getattr(self, f) is not None]
        if len(holders) != 1:
            raise ValueError(f"Dataset {self.name!r} needs exactly one of images, image_paths, regions; got {holders}")
        n = self.num_items
        object.__setattr__(self, "caption_item", np.asarray(self.caption_item, dtype=np.int64))
        object.__setattr__(self, "item_split", np.asarray(self.item_split, dtype=str))
        object.__setattr__(self, "item_group", np.asarray(self.item_group, dtype=np.int64))
        if self.region_rows is not None:
            object.__setattr__(self, "region_rows", np.asarray(self.region_rows, dtype=np.int64))
        for field, want in (("item_split", n), ("item_group", n), ("caption_item", len(self.captions))):
            got = len(getattr(self, field))
            if got != want:
                raise ValueError(f"Dataset {self.name!r}: {field} must have length {want}; got {got}")
        for field in ("item_names", "item_styles"):
            if getattr(self, field) is not None and len(getattr(self, field)) != n:
                raise ValueError(f"Dataset {self.name!r}: {field} must have length {n}; got {len(getattr(self, field))}")
        if len(self.caption_item) and (self.caption_item.min() < 0 or self.caption_item.max() >= n):
            raise ValueError(f"Dataset {self.name!r}: caption_item must index items 0..{n - 1}")
        bad = sorted(set(np.unique(self.item_split)) - set(SPLITS))
        if bad:
            raise ValueError(f"Dataset {self.name!r}: item_split must be one of {SPLITS}; got {bad}")

    @property
    def kind(self) -> str:
        """`"images"` (pixels in memory), `"image_files"` or `"regions"`."""
        if self.images is not None:
            return "images"
        return "image_files" if self.image_paths is not None else "regions"

    @property
    def num_items(self) -> int:
        if self.images is not None:
            return len(self.images)
        if self.image_paths is not None:
            return len(self.image_paths)
        return len(self.region_rows) if self.region_rows is not None else len(self.regions)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def region_features(self, items) -> np.ndarray:
        """`[len(items), R, F]` float32 region features of the given item indices (reads only those rows)."""
        rows = np.asarray(items) if self.region_rows is None else self.region_rows[np.asarray(items)]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows),) + tuple(self.regions.shape[1:]), dtype=np.float32)
        out[order] = self.regions[rows[order]]
        return out

    def split(self, name: str) -> "Dataset":
        """The items of one split with their captions, re-indexed from 0 (groups keep their ids)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {name!r}")
        return self.subset(np.flatnonzero(self.item_split == name), name=f"{self.name}:{name}")

    def subset(self, items, name: Optional[str] = None) -> "Dataset":
        """The given items (indices, in that order) with their captions, re-indexed from 0."""
        items = np.asarray(items, dtype=np.int64)
        new_index = np.full(self.num_items, -1, dtype=np.int64)
        new_index[items] = np.arange(len(items))
        keep = np.flatnonzero(new_index[self.caption_item] >= 0)
        keep = keep[np.argsort(new_index[self.caption_item[keep]], kind="stable")]
        fields = dict(
            name=name or self.name,
            captions=[self.captions[c] for c in keep],
            caption_item=new_index[self.caption_item[keep]],
            item_split=self.item_split[items],
            item_group=self.item_group[items],
            item_names=None if self.item_names is None else np.asarray(self.item_names)[items],
            item_styles=None if self.item_styles is None else np.asarray(self.item_styles)[items],
        )
        if self.images is not None:
            fields["images"] = self.images[items]
        elif self.image_paths is not None:
            fields["image_paths"] = np.asarray(self.image_paths)[items]
        else:
            rows = items if self.region_rows is None else self.region_rows[items]
            fields.update(regions=self.regions, region_rows=rows)
        return Dataset(**fields)

    def with_caption_parts(self, split: str = "train", separator: str = ",") -> "Dataset":
        """The data set where each caption of `split` that lists parts (`"bone, meat, meat on bone"`) also gives
        every part as a caption of its own item (`"bone"`, `"meat"`, `"meat on bone"`).

        A part the item already has as a caption, or an empty one, is not added again; other splits are unchanged.
        Each item keeps its captions first, then its new parts, in the order they were listed. Meant for keyword
        lists (the emoji data's CLDR keywords): single words paired with every image they describe teach the text
        tower what each word looks like.

        Returns:
            a new `Dataset` with the same items and more captions (this one when nothing is added).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        if not isinstance(separator, str) or not separator.strip():
            raise ValueError(f"separator must be a non-blank string; got {separator!r}")
        order = np.argsort(self.caption_item, kind="stable")
        starts = np.searchsorted(self.caption_item[order], np.arange(self.num_items + 1))
        captions, caption_item = [], []
        for item in range(self.num_items):
            own = [self.captions[c] for c in order[starts[item]:starts[item + 1]]]
            parts = []
            if self.item_split[item] == split:
                have = set(own)
                for caption in own:
                    pieces = [piece.strip() for piece in caption.split(separator)]
                    for piece in pieces if len(pieces) > 1 else ():
                        if piece and piece not in have:
                            have.add(piece)
                            parts.append(piece)
            captions += own + parts
            caption_item += [item] * (len(own) + len(parts))
        if len(captions) == self.num_captions:
            return self
        return dataclasses.replace(self, captions=captions, caption_item=np.asarray(caption_item, dtype=np.int64))

    def item_captions(self, item: int) -> list:
        """The captions of one item."""
        return [self.captions[c] for c in np.flatnonzero(self.caption_item == item)]

    def summary(self, print_fn=print) -> str:
        """Counts per split, captions per item and vocabulary size; printed with `print_fn` and returned."""
        captions_per_item = np.bincount(self.caption_item, minlength=self.num_items)
        words = Counter(w for c in self.captions for w in c.lower().split())
        lines = [f"Dataset {self.name!r} ({self.kind}): {self.num_items} items, {self.num_captions} captions, "
                 f"{len(np.unique(self.item_group))} groups, vocabulary {len(words)} words"]
        lines.append(f"  {'split':<6} {'items':>7} {'captions':>9} {'groups':>7} {'captions/item':>14}")
        for split in SPLITS:
            in_split = self.item_split == split
            n_caps = int(captions_per_item[in_split].sum())
            n_items = int(in_split.sum())
            lines.append(f"  {split:<6} {n_items:>7} {n_caps:>9} {len(np.unique(self.item_group[in_split])):>7} "
                         f"{(n_caps / n_items if n_items else 0):>14.2f}")
        text = "\n".join(lines)
        if print_fn is not None:
            print_fn(text)
        return text
