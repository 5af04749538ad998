"""Build the built-in emoji set's second style, Twemoji, from the npm package `@twemoji/svg` rendered with CairoSVG.

The style file holds images only; captions, groups and splits come from the Noto file by emoji
(`tfemde.data.builtin.read_emoji_styles`). Needs `pip install cairosvg` (the `build-data` extra, and the system's
libcairo) and, unless `svg_dir` is given, `npm` to fetch the package. The command line is
`tfemde data build-emoji OUT --style twemoji [--svg-dir DIR]`.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from tfemde.data.build_emoji import _palette_image
from tfemde.data.builtin import STYLE_FORMAT, read_emoji_file
from tfemde.files import atomic_write

TWEMOJI_PACKAGE = "@twemoji/svg"
TWEMOJI_VERSION = "15.0.0"


def twemoji_file_names(emoji_text: str) -> list:
    """The SVG file names Twemoji may use for an emoji, most likely first: code points in hex joined by "-", with
    U+FE0F kept (ZWJ sequences keep it) and without it (single characters and keycaps drop it).

    Example:
        >>> twemoji_file_names("\\u2764\\ufe0f")
        ['2764-fe0f.svg', '2764.svg']
    """
    points = [f"{ord(ch):x}" for ch in emoji_text]
    names = ["-".join(points) + ".svg"]
    without = [p for p in points if p != "fe0f"]
    if without != points:
        names.append("-".join(without) + ".svg")
    return names


def fetch_twemoji(folder, version: str = TWEMOJI_VERSION) -> Path:
    """Download `@twemoji/svg@version` with `npm pack` into `folder` and unpack its SVG files; returns their folder."""
    folder = Path(folder)
    try:
        done = subprocess.run(["npm", "pack", f"{TWEMOJI_PACKAGE}@{version}", "--silent"], cwd=folder,
                              capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise RuntimeError("fetching Twemoji needs npm (apt-get install npm), or pass svg_dir with the package's "
                           "SVG files") from None
    if done.returncode != 0:
        raise RuntimeError(f"npm pack {TWEMOJI_PACKAGE}@{version} failed: {done.stderr.strip()[-500:]}")
    archive = folder / done.stdout.strip().splitlines()[-1]
    svg_dir = folder / "svg"
    svg_dir.mkdir()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.endswith(".svg") and "/" not in name:
                (svg_dir / name).write_bytes(tar.extractfile(member).read())
    return svg_dir


def render_svg(svg: bytes, size: int) -> np.ndarray:
    """`[size, size, 3]` uint8: an SVG drawn by CairoSVG at `size` pixels, composited on white (as the Noto set)."""
    import cairosvg
    from PIL import Image

    png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image).convert("RGB"), dtype=np.uint8)


def build_twemoji(out_path, svg_dir=None, size: int = 64, palette: int = 256, emoji_subset=None,
                  version: str = TWEMOJI_VERSION, progress: bool = True) -> dict:
    """Render Twemoji for the emoji of the shipped Noto set and write the style file `out_path` (`.npz`).

    Args:
        out_path: the `.npz` to write (through a temporary file moved into place).
        svg_dir: a folder with the package's SVG files; None fetches `@twemoji/svg@version` with npm.
        size: image side in pixels; the Noto set's size, so that the styles can be trained together.
        palette: colours per image (2..256), as the Noto set.
        emoji_subset: only these emoji (for tests and quick builds); None for every emoji of the Noto set.
        version: the npm package version (recorded in the file).
        progress: show a tqdm progress bar.

    Returns:
        counts: `images`, `missing` (emoji Twemoji has no file for), `bytes`.
    """
    from tqdm.auto import tqdm

    size, palette = int(size), int(palette)
    base = read_emoji_file()
    if size != base.images.shape[1]:
        raise ValueError(f"size must be the Noto set's image size ({base.images.shape[1]}); got {size}")
    if not 2 <= palette <= 256:
        raise ValueError(f"palette must be 2..256 colours; got {palette}")
    known = [str(name) for name in base.item_names]
    wanted = known if emoji_subset is None else list(emoji_subset)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"emoji_subset must hold emoji of the built-in set; got unknown {unknown}")
    with tempfile.TemporaryDirectory(prefix="tfemde-twemoji-") as scratch:
        folder = Path(svg_dir) if svg_dir is not None else fetch_twemoji(scratch, version)
        if not folder.is_dir():
            raise FileNotFoundError(f"svg_dir {folder} is not a folder of Twemoji SVG files")
        names, indices, palettes, missing = [], [], [], 0
        for emoji_text in tqdm(wanted, desc="rendering Twemoji", unit="emoji", disable=not progress):
            path = next((folder / n for n in twemoji_file_names(emoji_text) if (folder / n).is_file()), None)
            if path is None:
                missing += 1
                continue
            image, colours = _palette_image(render_svg(path.read_bytes(), size), palette)
            names.append(emoji_text)
            indices.append(image)
            palettes.append(colours)
    if not names:
        raise ValueError(f"no Twemoji SVG found for any of the {len(wanted)} emoji in {folder}")
    arrays = dict(format=np.array(STYLE_FORMAT), style=np.array("twemoji"), size=np.array(size, dtype=np.int64),
                  names=np.array(names, dtype=str), indices=np.stack(indices).astype(np.uint8),
                  palettes=np.stack(palettes).astype(np.uint8),
                  sources=np.array([f"{TWEMOJI_PACKAGE} {version} (npm)", f"cairosvg {_cairosvg_version()}"]))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(out_path, write)
    return {"images": len(names), "missing": missing, "bytes": out_path.stat().st_size}


def _cairosvg_version() -> str:
    from importlib import metadata

    return metadata.version("cairosvg")
