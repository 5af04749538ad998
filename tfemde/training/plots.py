"""Pictures people would rather see than read: training curves and retrieval examples, saved as PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tfemde.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi) -> Path:
    """Write `fig` as a PNG through a temporary file (never a half-written picture), then close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _pyplot().close(fig)
    return path


def plot_history(history, path, title=None) -> Path:
    """Loss and validation RSUM per epoch, side by side.

    Args:
        history: a `history.csv` path written by `keras.callbacks.CSVLogger`, or a dict `{metric: [values]}`
            (e.g. `keras.callbacks.History.history`).
        path: the PNG to write.
        title: an optional figure title.
    """
    if not isinstance(history, dict):
        with open(history, newline="") as handle:
            rows = list(csv.DictReader(handle))
        # CSVLogger writes "NA" for epochs without the metric (validation every few epochs): those are gaps.
        history = {key: [float(row[key]) if row.get(key) not in (None, "", "NA") else np.nan for row in rows]
                   for key in rows[0]} if rows else {}
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))

    def points(key):
        values = np.asarray(history.get(key) or [], dtype=float)
        epochs = np.arange(1, len(values) + 1)
        return epochs[np.isfinite(values)], values[np.isfinite(values)]

    for key in ("loss", "val_loss"):
        epochs, values = points(key)
        if len(values):
            left.plot(epochs, values, marker="o", label=key)
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    left.legend()
    epochs, values = points("val_rsum")
    if len(values):
        right.plot(epochs, values, marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel="RSUM (max 600)", title="validation RSUM")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_text_to_image(queries, images, top_items, path, scores=None, relevant=None, title=None) -> Path:
    """A grid: one row per text query, its top images left to right (a green frame marks a correct one).

    Args:
        queries: `[Q]` query strings.
        images: `[N, H, W, 3]` uint8 (or float in [0, 1]) images indexed by `top_items`.
        top_items: `[Q, k]` item indices, best first.
        path: the PNG to write.
        scores: optional `[Q, k]` similarity scores printed under each image.
        relevant: optional `[Q, k]` bool, True where the retrieved item is a match.
        title: an optional figure title.
    """
    top_items = np.asarray(top_items)
    num_queries, k = top_items.shape
    plt = _pyplot()
    fig, axes = plt.subplots(num_queries, k + 1, figsize=(1.5 * (k + 1) + 1.5, 1.5 * num_queries), squeeze=False)
    for row, query in enumerate(queries):
        axes[row, 0].axis("off")
        axes[row, 0].text(0.98, 0.5, "\n".join(_wrap(query, 22)), ha="right", va="center", fontsize=9)
        for col in range(k):
            axis = axes[row, col + 1]
            axis.imshow(images[top_items[row, col]])
            axis.set_xticks([]), axis.set_yticks([])
            correct = relevant is not None and bool(relevant[row][col])
            for spine in axis.spines.values():
                spine.set_edgecolor("tab:green" if correct else "lightgray")
                spine.set_linewidth(3 if correct else 1)
            if scores is not None:
                axis.set_xlabel(f"{scores[row][col]:.2f}", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def plot_image_to_text(images, top_captions, path, relevant=None, title=None) -> Path:
    """One row per query image: the image, then its top captions as text (correct ones in green)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(images), 2, figsize=(7.5, 1.4 * len(images)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for row, (image, captions) in enumerate(zip(images, top_captions)):
        axes[row, 0].imshow(image)
        axes[row, 0].axis("off")
        axes[row, 1].axis("off")
        for i, caption in enumerate(captions):
            correct = relevant is not None and bool(relevant[row][i])
            axes[row, 1].text(0.0, 1.0 - (i + 0.5) / max(len(captions), 1), f"{i + 1}. {caption[:70]}",
                              va="center", fontsize=8, color="tab:green" if correct else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, dpi=100)


def _wrap(text, width):
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return (lines + [line])[:4] if line else lines[:4]
