"""Sinusoidal positional encodings computed in-graph from positions (no Python-side cache)."""

import math

from keras import ops

from tfemde.layers.masking import check_rank, float_mask


def _sinusoid(positions, dim, temperature=10000.0):
    """Transformer sinusoids of float `positions` `[...]` -> `[..., dim]`.

    Channel `i` uses frequency `temperature ** (-2 * (i // 2) / dim)`; even channels hold the sine
    and odd channels the cosine (DivE's interleaved layout and VSE-infinity's `pe[:, 0::2] = sin`,
    `pe[:, 1::2] = cos` are the same thing).
    """
    channels = ops.arange(dim, dtype="int32")
    pair = ops.cast((channels // 2) * 2, "float32")
    inv_freq = ops.exp(pair * (-math.log(temperature) / dim))
    angles = ops.expand_dims(positions, -1) * inv_freq
    return ops.where(ops.equal(channels % 2, 0), ops.sin(angles), ops.cos(angles))


def _check_dim(dim, arg="dim"):
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"{arg} must be a positive int; got {dim!r}")


def sine_positional_encoding(
    lengths_or_mask,
    length=None,
    dim=None,
    normalize=True,
    scale=2.0 * math.pi,
    temperature=10000.0,
    epsilon=1e-6,
    dtype="float32",
):
    """DivE's 1-D sine encoding of sequence positions, normalised by each sample's true length.

    Valid position j (1-based, counted over valid elements only) of a sample with n valid elements
    is mapped to `j / (n + epsilon) * scale` when `normalize`, else to `j`, then encoded with
    `_sinusoid`. Padded positions are all zeros.

    Deviation from DivE (ALGORITHMS.md §3.2, §9.15): the reference divides by the padded batch
    length, so a caption's encoding depends on the longest caption in its batch; here it depends
    on the caption alone.

    Args:
        lengths_or_mask: either `[B]` integer lengths (right padding assumed), or a `[B, L]` mask
            (bool or 0/1 of any dtype; any padding layout).
        length: `L`, the padded length; required with lengths, ignored with a mask.
        dim: the encoding size (the key width it is added to, e.g. 300 for GloVe words).
        normalize: scale positions to `(0, scale]` by the true length.
        scale: the normalised range, 2π as in DivE.
        temperature: the frequency base, 10000.
        epsilon: added to the length before dividing (1e-6 as in DivE).
        dtype: the float dtype of the result.

    Returns:
        `[B, L, dim]` encoding, zeros at padded positions.

    Example:
        >>> pe = sine_positional_encoding([3, 1], length=4, dim=8)
        >>> tuple(pe.shape)
        (2, 4, 8)
    """
    _check_dim(dim)
    x = ops.convert_to_tensor(lengths_or_mask)
    if len(x.shape) == 1:
        if length is None:
            raise ValueError("length must be given when lengths_or_mask holds lengths of shape [batch]")
        mask = ops.less(ops.expand_dims(ops.arange(length, dtype="int32"), 0), ops.expand_dims(ops.cast(x, "int32"), 1))
    else:
        check_rank(x.shape, 2, "lengths_or_mask", "[batch] (lengths) or [batch, length] (mask)")
        mask = x
    m = float_mask(mask, None, "float32")
    positions = ops.cumsum(m, axis=1)
    if normalize:
        positions = positions / (ops.sum(m, axis=1, keepdims=True) + epsilon) * scale
    pe = _sinusoid(positions, dim, temperature) * ops.expand_dims(m, -1)
    return ops.cast(pe, dtype)


def rank_positional_encoding(length, dim=32, temperature=10000.0, dtype="float32"):
    """GPO's encoding of rank positions 0..length-1 (VSE-infinity `positional_encoding_1d`).

    Args:
        length: the number of ranks `L` (int or scalar tensor).
        dim: the encoding size `d_pe` (32 in GPO).
        temperature: the frequency base, 10000.
        dtype: the float dtype of the result.

    Returns:
        `[L, dim]`; row k is `sin(k w_j)` in channel 2j and `cos(k w_j)` in channel 2j+1, with
        `w_j = exp(-2j ln(temperature) / dim)`.

    Example:
        >>> pe = rank_positional_encoding(5, dim=4)
        >>> tuple(pe.shape), [float(v) for v in pe[0]]
        ((5, 4), [0.0, 1.0, 0.0, 1.0])
    """
    _check_dim(dim)
    positions = ops.cast(ops.arange(length, dtype="int32"), "float32")
    return ops.cast(_sinusoid(positions, dim, temperature), dtype)
