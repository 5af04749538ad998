"""Build the emoji data set from Debian's Noto Color Emoji font and CLDR annotations and PyPI `emoji`.

Needs `apt-get install fonts-noto-color-emoji unicode-cldr-core` and `pip install emoji` (the `build-data` extra).
The command line is `tfemde data build-emoji OUT [--size 64] [--langs en,de]`.
"""

from __future__ import annotations

import argparse
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from tfemde.data.builtin import FORMAT, group_key, group_splits
from tfemde.files import atomic_write

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR_DIR = "/usr/share/unicode/cldr/common"
# Pillow draws the CBDT bitmap font only at its native strike size, and only with embedded_color=True.
NATIVE_SIZE = 109
CELL = 136  # the font's glyph cell at NATIVE_SIZE is 136 x 128 px; render on a 136 x 136 square
_CLDR_INHERIT = "↑↑↑"


def _font_revision(path) -> str:
    """fontRevision (16.16 fixed) from the TrueType `head` table, e.g. `"2.042"`."""
    with open(path, "rb") as f:
        data = f.read(12)
        num_tables = struct.unpack(">H", data[4:6])[0]
        table_dir = f.read(16 * num_tables)
        for i in range(num_tables):
            tag, _, offset, _ = struct.unpack(">4sIII", table_dir[16 * i:16 * (i + 1)])
            if tag == b"head":
                f.seek(offset + 4)
                return f"{struct.unpack('>i', f.read(4))[0] / 65536:.3f}"
    return "unknown"


def _cldr_version(cldr_dir: Path) -> str:
    dtd = cldr_dir / "dtd" / "ldml.dtd"
    if dtd.is_file():
        m = re.search(r'cldrVersion CDATA #FIXED "([^"]+)"', dtd.read_text(encoding="utf-8"))
        if m:
            return m.group(1)
    return "unknown"


def read_cldr_annotations(cldr_dir, lang: str) -> dict:
    """`{emoji without U+FE0F: {"tts": name, "keywords": [..]}}` from CLDR `annotations` and `annotationsDerived`."""
    cldr_dir = Path(cldr_dir)
    out = {}
    files = [cldr_dir / sub / f"{lang}.xml" for sub in ("annotations", "annotationsDerived")]
    if not files[0].is_file():
        raise FileNotFoundError(f"CLDR annotations {files[0]} not found (install the Debian package "
                                f"unicode-cldr-core, or pass cldr_dir; lang must be a CLDR locale such as 'en')")
    for path in files:
        if not path.is_file():
            continue
        for node in ET.parse(path).getroot().iter("annotation"):
            text = (node.text or "").strip()
            if not text or text == _CLDR_INHERIT:
                continue
            entry = out.setdefault(node.get("cp"), {})
            if node.get("type") == "tts":
                entry["tts"] = text
            else:
                entry["keywords"] = [k.strip() for k in text.split("|") if k.strip()]
    return out


def _package_name(name: str) -> str:
    """`":thumbs_up_medium_skin_tone:"` -> `"thumbs up medium skin tone"`."""
    return " ".join(name.strip(":").replace("_", " ").split())


def _dedup_key(caption: str) -> str:
    return " ".join(re.sub(r"[^\w+]+", " ", caption.lower()).split())


def emoji_captions(emoji_text: str, cldr: dict, package_entry: dict, langs) -> list:
    """Captions of one emoji: per language the CLDR short name and keyword list and the `emoji` package's name,
    plus the package's English aliases; duplicates (ignoring case and punctuation) removed, order kept."""
    captions, seen = [], set()

    def add(text):
        text = " ".join(text.split())
        key = _dedup_key(text)
        if text and key not in seen:
            seen.add(key)
            captions.append(text)

    stripped = emoji_text.replace("\ufe0f", "")
    for lang in langs:
        entry = cldr[lang].get(stripped, {})
        if "tts" in entry:
            add(entry["tts"])
        if entry.get("keywords"):
            add(", ".join(entry["keywords"]))
        if lang in package_entry:
            add(_package_name(package_entry[lang]))
        if lang == "en":
            for alias in package_entry.get("alias", []):
                add(_package_name(alias))
    return captions


class _Renderer:
    """Draws one emoji with Pillow at the font's native size, composites it on white and resizes it."""

    def __init__(self, font_path, size):
        from PIL import ImageFont, features

        self.size = size
        self.font = ImageFont.truetype(str(font_path), size=NATIVE_SIZE)
        if not features.check("raqm"):
            import warnings

            warnings.warn("Pillow has no raqm layout: ZWJ sequences and flags will lay out as several glyphs and "
                          "be skipped", stacklevel=3)
        left, _, right, _ = self.font.getbbox("\U0001F600")
        self.glyph_width = right - left

    def __call__(self, emoji_text):
        """`(image [size, size, 3] uint8, None)` or `(None, reason)` for a missing or multi-glyph emoji."""
        from PIL import Image, ImageDraw

        left, top, right, bottom = self.font.getbbox(emoji_text)
        if right - left > 1.25 * self.glyph_width:
            return None, "wide"
        canvas = Image.new("RGBA", (CELL, CELL), (0, 0, 0, 0))
        xy = ((CELL - (right - left)) / 2 - left, (CELL - (bottom - top)) / 2 - top)
        ImageDraw.Draw(canvas).text(xy, emoji_text, font=self.font, embedded_color=True)
        if canvas.getextrema()[3][1] == 0:  # a glyph the font lacks draws fully transparent
            return None, "missing"
        white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, canvas).convert("RGB")
        return np.asarray(rgb.resize((self.size, self.size), Image.LANCZOS)), None


def _palette_image(image: np.ndarray, palette: int):
    """`(indices [S, S] uint8, palette [palette, 3] uint8)`: an adaptive palette (Pillow's fast octree, no dither)."""
    from PIL import Image

    quantized = Image.fromarray(image).quantize(palette, method=Image.Quantize.FASTOCTREE,
                                                dither=Image.Dither.NONE)
    colours = np.asarray(quantized.getpalette("RGB"), dtype=np.uint8).reshape(-1, 3)[:palette]
    table = np.zeros((palette, 3), dtype=np.uint8)
    table[:len(colours)] = colours
    return np.asarray(quantized, dtype=np.uint8), table


def build_emoji(out_path, size: int = 64, langs=("en",), palette: int = 256, emoji_subset=None,
                font_path=FONT_PATH, cldr_dir=CLDR_DIR, progress: bool = True) -> dict:
    """Render the emoji data set and write it to `out_path` (an `.npz` that `tfemde.data.load` reads).

    Every fully-qualified emoji of the `emoji` package that the font draws as one glyph becomes one image (emoji the
    font lacks, which draw transparent, and sequences that lay out as several glyphs are skipped). Captions come from
    CLDR (short name, keyword list; keys matched without U+FE0F) and the `emoji` package (names, English aliases);
    emoji newer than the CLDR release keep the package's captions. The file is written to a temporary file first
    and moved into place.

    Args:
        out_path: the `.npz` file to write.
        size: image side in pixels (> 0).
        langs: caption languages, CLDR locale names (`"en"`, `"de"`, ...).
        palette: colours per image of an adaptive palette (2..256; 256 keeps the mean error near 1.5/255 and
            halves the file), or 0 to store lossless RGB pixels.
        emoji_subset: only these emoji (for tests and quick builds); None for all.
        font_path: the Noto Color Emoji TTF (Debian `fonts-noto-color-emoji`).
        cldr_dir: CLDR `common` folder (Debian `unicode-cldr-core`).
        progress: show a tqdm progress bar.

    Returns:
        A dict of counts: `images`, `captions`, `groups`, `skipped_missing`, `skipped_wide`, `without_cldr`,
        `bytes`, and per split `train`/`val`/`test` images.

    Example:
        >>> stats = build_emoji("/tmp/emoji_tiny.npz", size=32, emoji_subset=["\U0001F600", "\U0001F44D"],
        ...                     progress=False)
        >>> stats["images"]
        2
    """
    import emoji as emoji_package
    from tqdm.auto import tqdm

    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels; got {size}")
    if isinstance(langs, str):
        langs = [langs]
    langs = [str(lang) for lang in langs]
    if not langs:
        raise ValueError("langs must name at least one language; got none")
    if palette and not 2 <= palette <= 256:
        raise ValueError(f"palette must be 0 (lossless) or 2..256 colours; got {palette}")
    font_path, cldr_dir, out_path = Path(font_path), Path(cldr_dir), Path(out_path)
    if not font_path.is_file():
        raise FileNotFoundError(f"emoji font {font_path} not found (install the Debian package "
                                f"fonts-noto-color-emoji, or pass font_path)")
    cldr = {lang: read_cldr_annotations(cldr_dir, lang) for lang in langs}

    table = emoji_package.EMOJI_DATA
    fully_qualified = emoji_package.STATUS["fully_qualified"]
    if emoji_subset is None:
        candidates = [e for e, entry in table.items() if entry.get("status") == fully_qualified]
    else:
        candidates = list(emoji_subset)
        unknown = [e for e in candidates if e not in table]
        if unknown:
            raise ValueError(f"emoji_subset must hold emoji of the emoji package; got unknown {unknown}")

    render = _Renderer(font_path, size)
    names, keys, images, palettes, captions, caption_item = [], [], [], [], [], []
    stats = dict(skipped_missing=0, skipped_wide=0, skipped_no_caption=0, without_cldr=0)
    for e in tqdm(candidates, desc="rendering emoji", unit="emoji", disable=not progress):
        image, reason = render(e)
        if image is None:
            stats[f"skipped_{reason}"] += 1
            continue
        texts = emoji_captions(e, cldr, table[e], langs)
        if not texts:
            stats["skipped_no_caption"] += 1
            continue
        stats["without_cldr"] += not any(e.replace("\ufe0f", "") in cldr[lang] for lang in langs)
        caption_item.extend([len(names)] * len(texts))
        captions.extend(texts)
        names.append(e)
        keys.append(group_key(e))
        if palette:
            image, colours = _palette_image(image, palette)
            palettes.append(colours)
        images.append(image)

    sources = [f"Noto Color Emoji {_font_revision(font_path)}", f"Unicode CLDR {_cldr_version(cldr_dir)}",
               f"emoji {emoji_package.__version__}"]
    arrays = dict(format=np.array(FORMAT), size=np.array(size, dtype=np.int64), names=np.array(names, dtype=str),
                  group_keys=np.array(keys, dtype=str),
                  captions=np.array(captions, dtype=str), caption_item=np.array(caption_item, dtype=np.int32),
                  langs=np.array(langs, dtype=str), sources=np.array(sources, dtype=str))
    shape = (len(names), size, size)
    if palette:
        arrays.update(indices=np.array(images, dtype=np.uint8).reshape(shape),
                      palettes=np.array(palettes, dtype=np.uint8).reshape(len(names), palette, 3))
    else:
        arrays["pixels"] = np.array(images, dtype=np.uint8).reshape(shape + (3,))
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(out_path, write)
    splits = group_splits(keys)
    stats.update(images=len(names), captions=len(captions), groups=len(set(keys)), bytes=out_path.stat().st_size,
                 **{s: int((splits == s).sum()) for s in ("train", "val", "test")})
    return stats


def main(argv=None) -> int:
    """`tfemde data build-emoji OUT [--size 64] [--langs en,de] [--palette 256] [--only EMOJI ...] [--quiet]`."""
    parser = argparse.ArgumentParser(prog="tfemde data build-emoji", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the .npz file to write")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--langs", default="en", help="comma-separated CLDR locales for captions (default en)")
    parser.add_argument("--palette", type=int, default=256,
                        help="colours per image PNG palette, 0 for lossless RGB (default 256)")
    parser.add_argument("--font", default=FONT_PATH, help=f"Noto Color Emoji TTF (default {FONT_PATH})")
    parser.add_argument("--cldr", default=CLDR_DIR, help=f"CLDR common folder (default {CLDR_DIR})")
    parser.add_argument("--only", nargs="+", metavar="EMOJI", help="build only these emoji (a quick check)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    stats = build_emoji(args.out, size=args.size, langs=langs, palette=args.palette, emoji_subset=args.only,
                        font_path=args.font, cldr_dir=args.cldr, progress=not args.quiet)
    print(f"wrote {args.out}: {stats['images']} images ({stats['train']} train, {stats['val']} val, "
          f"{stats['test']} test), {stats['groups']} groups, {stats['captions']} captions, "
          f"{stats['bytes'] / 2**20:.1f} MiB; skipped {stats['skipped_missing']} missing from the font, "
          f"{stats['skipped_wide']} multi-glyph, {stats['skipped_no_caption']} without captions; "
          f"{stats['without_cldr']} captioned by the emoji package only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
