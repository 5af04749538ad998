"""`Embeddings`: the set (and optional sketch) embeddings of N items, as the encoders produce them (NumPy only)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


def _shape(x) -> tuple:
    return tuple(np.shape(x))


def max_element_norm(sets: np.ndarray, mask: Optional[np.ndarray] = None, name: str = "sets") -> float:
    """The largest L2 norm among the valid elements of `sets [N, K, D]` (0 when there are none).

    Raises ValueError naming the first valid element that is not finite.
    """
    if sets.size == 0:
        return 0.0
    sq = np.einsum("nkd,nkd->nk", sets, sets)  # float32; inf only for norms > 1.8e19 (rechecked below)
    valid = np.ones(sq.shape, bool) if mask is None else mask
    bad = valid & ~np.isfinite(sq)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        sq = sq.astype(np.float64)
        sq[rows] = np.einsum("nkd,nkd->nk", sets[rows], sets[rows], dtype=np.float64)
        bad = valid & ~np.isfinite(sq)
        if bad.any():
            item, element = np.argwhere(bad)[0]
            raise ValueError(f"{name} must be finite where the set mask is True; item {item} element {element} "
                             "is not")
    if mask is not None:
        sq = np.where(mask, sq, 0.0)
    return float(np.sqrt(np.float64(sq.max())))


@dataclasses.dataclass(frozen=True, eq=False)
class Embeddings:
    """Set embeddings of N items (images or captions), with optional T-EMDE sketches and a set mask.

    Every item is a set of K element vectors of dimension D. The encoders L2-normalise every element, and the
    Smooth-Chamfer similarity is meant for unit elements (it stays exact and finite for any finite values).
    A model with one global vector per item passes `sets` of shape `[N, D]`, stored as `[N, 1, D]`.

    Args:
        sets: `[N, K, D]` (or `[N, D]` for K = 1) element vectors; stored as C-contiguous float32.
        sketches: `[N, depth, W]` T-EMDE sketches with L2-normalised rows, or the flattened `[N, depth·W]`
            together with `sketch_depth`. Stored flattened, `[N, S]` float32 with `S = depth·W`. None: no sketch.
        set_mask: `[N, K]` bool or 0/1 of any numeric dtype; False marks padded elements, which change nothing
            whatever values they hold. None means all valid. Stored as bool.
        sketch_depth: the number of partitionings `depth` in the flattened sketch. Required with 2-D sketches
            (the sketch similarity is the mean of the `depth` row cosines, i.e. `dot / depth`); inferred from
            3-D sketches. Ignored (and stored as None) without sketches.

    Returns (attributes): `sets [N, K, D]`, `sketches [N, S] | None`, `set_mask [N, K] bool | None`,
    `sketch_depth int | None`, and `max_norm`, the largest norm of a valid element (about 1 for normalised sets),
    which bounds the similarity's logits.

    Example:
        >>> import numpy as np
        >>> from tfemde.serving import Embeddings
        >>> x = np.random.default_rng(0).normal(size=(3, 4, 8)).astype("float32")
        >>> e = Embeddings(x / np.linalg.norm(x, axis=-1, keepdims=True))
        >>> len(e), e.num_elements, e.dim, len(e[1:]), len(Embeddings.concat([e, e.take([0, 2])]))
        (3, 4, 8, 2, 5)
    """

    sets: np.ndarray
    sketches: Optional[np.ndarray] = None
    set_mask: Optional[np.ndarray] = None
    sketch_depth: Optional[int] = None
    max_norm: float = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        sets = np.asarray(self.sets)
        if sets.ndim == 2:
            sets = sets[:, None, :]
        if sets.ndim != 3:
            raise ValueError(f"sets must have shape [N, K, D] (or [N, D]); got shape {_shape(self.sets)}")
        if not (np.issubdtype(sets.dtype, np.floating) or np.issubdtype(sets.dtype, np.integer)):
            raise ValueError(f"sets must hold real numbers; got dtype {sets.dtype}")
        sets = np.ascontiguousarray(sets, dtype=np.float32)
        n, k, _ = sets.shape
        if k == 0:
            raise ValueError(f"sets must have at least one element per item (K >= 1); got shape {sets.shape}")

        mask = None
        if self.set_mask is not None:
            raw = np.asarray(self.set_mask)
            if raw.shape != (n, k):
                raise ValueError(f"set_mask must have shape [N, K] = {(n, k)} to match sets; got shape {raw.shape}")
            mask = raw.astype(bool) if raw.dtype != bool else raw
            mask = np.ascontiguousarray(mask)

        max_norm = max_element_norm(sets, mask)

        sketches, depth = self.sketches, self.sketch_depth
        if sketches is not None:
            sketches = np.asarray(sketches)
            if sketches.ndim == 3:
                if depth is not None and int(depth) != sketches.shape[1]:
                    raise ValueError(f"sketch_depth={depth} does not match sketches of shape [N, depth, W] = "
                                     f"{sketches.shape}")
                depth = sketches.shape[1]
                sketches = sketches.reshape(sketches.shape[0], -1)
            elif sketches.ndim == 2:
                if depth is None:
                    raise ValueError("sketch_depth is required with flattened sketches [N, depth*W] (the sketch "
                                     "similarity is dot/depth); pass sketch_depth or sketches of shape "
                                     f"[N, depth, W]; got sketches of shape {sketches.shape}")
            else:
                raise ValueError(f"sketches must have shape [N, depth*W] or [N, depth, W]; got shape "
                                 f"{_shape(self.sketches)}")
            if sketches.shape[0] != n:
                raise ValueError(f"sketches must have N = {n} rows to match sets; got shape {_shape(self.sketches)}")
            depth = int(depth)
            if depth < 1 or sketches.shape[1] % depth:
                raise ValueError(f"sketch_depth must be a positive divisor of the sketch size {sketches.shape[1]}; "
                                 f"got {depth}")
            sketches = np.ascontiguousarray(sketches, dtype=np.float32)
            if not np.isfinite(sketches).all():
                raise ValueError("sketches must be finite")
        else:
            depth = None

        object.__setattr__(self, "sets", sets)
        object.__setattr__(self, "set_mask", mask)
        object.__setattr__(self, "sketches", sketches)
        object.__setattr__(self, "sketch_depth", depth)
        object.__setattr__(self, "max_norm", max_norm)

    # -- shape ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sets.shape[0]

    @property
    def num_elements(self) -> int:
        """K, the number of elements per set (padding included)."""
        return self.sets.shape[1]

    @property
    def dim(self) -> int:
        """D, the dimension of every element."""
        return self.sets.shape[2]

    @property
    def sketch_dim(self) -> Optional[int]:
        """S = depth·W, the size of the flattened sketch, or None without sketches."""
        return None if self.sketches is None else self.sketches.shape[1]

    def __repr__(self) -> str:
        sk = "None" if self.sketches is None else f"[{len(self)}, {self.sketch_dim}] (depth {self.sketch_depth})"
        mask = "None" if self.set_mask is None else f"[{len(self)}, {self.num_elements}]"
        return f"Embeddings(sets=[{len(self)}, {self.num_elements}, {self.dim}], sketches={sk}, set_mask={mask})"

    # -- selection -----------------------------------------------------------------------------------------------
    def __getitem__(self, index) -> "Embeddings":
        """The items at `index` (a slice, an int, an int array or a bool mask of length N) as `Embeddings`.

        An int keeps the item axis: `e[3]` has length 1.
        """
        if isinstance(index, (int, np.integer)):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"index {index} is out of range for {n} items")
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == bool:
                if index.shape != (len(self),):
                    raise IndexError(f"a bool index must have shape [N] = ({len(self)},); got {index.shape}")
            elif not np.issubdtype(index.dtype, np.integer) and index.size:
                raise IndexError(f"index must be an int, a slice, ints or bools; got dtype {index.dtype}")
            else:
                index = index.astype(np.int64)
        return Embeddings(
            sets=self.sets[index],
            sketches=None if self.sketches is None else self.sketches[index],
            set_mask=None if self.set_mask is None else self.set_mask[index],
            sketch_depth=self.sketch_depth,
        )

    def take(self, indices) -> "Embeddings":
        """The items at the int `indices` `[M]`, in that order, as `Embeddings` of length M."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D int array; got shape {indices.shape} dtype {indices.dtype}")
        return self[indices]

    @staticmethod
    def concat(parts: Sequence["Embeddings"]) -> "Embeddings":
        """The items of `parts` one after the other. All parts need the same K, D, sketch size and depth.

        A part without a set mask counts as all valid when another part has one.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one Embeddings; got an empty sequence")
        for p in parts:
            if not isinstance(p, Embeddings):
                raise ValueError(f"concat takes Embeddings; got {type(p).__name__}")
        first = parts[0]
        for i, p in enumerate(parts[1:], 1):
            if p.sets.shape[1:] != first.sets.shape[1:]:
                raise ValueError(f"parts must share [K, D] = {first.sets.shape[1:]}; part {i} has {p.sets.shape[1:]}")
            if (p.sketch_dim, p.sketch_depth) != (first.sketch_dim, first.sketch_depth):
                raise ValueError(f"parts must share the sketch size and depth {(first.sketch_dim, first.sketch_depth)};"
                                 f" part {i} has {(p.sketch_dim, p.sketch_depth)}")
        if len(parts) == 1:
            return first
        masked = any(p.set_mask is not None for p in parts)
        return Embeddings(
            sets=np.concatenate([p.sets for p in parts]),
            sketches=None if first.sketches is None else np.concatenate([p.sketches for p in parts]),
            set_mask=None if not masked else np.concatenate(
                [p.set_mask if p.set_mask is not None else np.ones(p.sets.shape[:2], bool) for p in parts]),
            sketch_depth=first.sketch_depth,
        )
