"""The shipped emoji data set and its builder (needs Debian fonts-noto-color-emoji, unicode-cldr-core; PyPI emoji)."""

import hashlib
import importlib
import zipfile

import numpy as np
import pytest

from tfemde.data import Dataset, build_emoji, builtin, load

builder = importlib.import_module("tfemde.data.build_emoji")  # the module; tfemde.data.build_emoji is the function

SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
THUMBS_UP, THUMBS_UP_MEDIUM = "\U0001F44D", "\U0001F44D\U0001F3FD"
GRINNING, FLAG_FR, FAMILY = "\U0001F600", "\U0001F1EB\U0001F1F7", "\U0001F468\u200D\U0001F469\u200D\U0001F467"
BALLET_DANCER = "\U0001F9D1\u200D\U0001FA70"  # Emoji 17: the Noto 2.042 font draws it as two glyphs
BAGS_UNDER_EYES = "\U0001FAE9"  # Emoji 16: missing from the font, draws transparent
SUBSET = [GRINNING, THUMBS_UP, THUMBS_UP_MEDIUM, FLAG_FR, FAMILY, BALLET_DANCER, BAGS_UNDER_EYES]


def expected_split(key):
    """The documented rule, re-derived: BLAKE2b-64 of the group key, mod 100: <80 train, <90 val, else test."""
    h = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"tfemde-split").digest()
    bucket = (int.from_bytes(h, "little") & (2**63 - 1)) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def concept(e):
    stripped = "".join(ch for ch in e if ch not in SKIN_TONES and ch != "\ufe0f")
    return stripped or e


@pytest.fixture(scope="module")
def emoji_ds():
    return load("emoji")


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    path = tmp_path_factory.mktemp("emoji") / "tiny.npz"
    stats = build_emoji(path, size=32, emoji_subset=SUBSET, progress=False)
    return path, stats


# ------------------------------------------------------------------------------------------- shipped data set
def test_shipped_file_is_compact_and_has_notice():
    assert builtin.EMOJI_PATH.is_file()
    assert builtin.EMOJI_PATH.stat().st_size < 8 * 2**20
    notice = (builtin.BUILTIN_DIR / "NOTICE").read_text(encoding="utf-8")
    for needed in ("SIL OPEN FONT LICENSE Version 1.1", "Unicode-DFS-2016", "New BSD License", "Google Inc.",
                   "Unicode, Inc.", "Taehoon Kim"):
        assert needed in notice
    with zipfile.ZipFile(builtin.EMOJI_PATH) as z:  # plain arrays, loadable without pickles
        assert {"format.npy", "names.npy", "captions.npy", "indices.npy", "palettes.npy"} <= set(z.namelist())
    with np.load(builtin.EMOJI_PATH, allow_pickle=False) as z:
        assert str(z["format"]) == builtin.FORMAT


def test_shipped_images(emoji_ds):
    images = emoji_ds.images
    assert emoji_ds.kind == "images" and images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3)
    assert 3000 <= emoji_ds.num_items <= 5000
    # composited on white: corners white for almost every emoji, and every image has non-white artwork
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.mean(corners.min(axis=(1, 2)) >= 250) > 0.9
    assert (images.reshape(len(images), -1).min(axis=1) < 200).all()
    assert len(np.unique(images.reshape(len(images), -1)[:, ::97], axis=0)) > 0.9 * len(images)


def test_shipped_captions_and_names(emoji_ds):
    per_item = np.bincount(emoji_ds.caption_item, minlength=emoji_ds.num_items)
    assert per_item.min() >= 1
    assert 2.0 <= per_item.mean() <= 2.6  # name, keyword list, aliases (DATA.md measured ~2.3)
    assert all(isinstance(c, str) and c.strip() == c and c for c in emoji_ds.captions)
    names = list(emoji_ds.item_names)
    assert len(set(names)) == len(names)
    assert "grinning face" in emoji_ds.item_captions(names.index(GRINNING))
    assert "thumbs up: medium skin tone" in emoji_ds.item_captions(names.index(THUMBS_UP_MEDIUM))
    assert "flag: France" in emoji_ds.item_captions(names.index(FLAG_FR))


def test_shipped_groups_and_splits(emoji_ds):
    names = list(emoji_ds.item_names)
    for split in ("train", "val", "test"):
        share = np.mean(emoji_ds.item_split == split)
        assert abs(share - {"train": 0.8, "val": 0.1, "test": 0.1}[split]) < 0.04
    # every split follows the documented hash rule; groups are the concept without skin tones
    assert [expected_split(concept(e)) for e in names] == list(emoji_ds.item_split)
    by_concept = {}
    for e, g in zip(names, emoji_ds.item_group):
        by_concept.setdefault(concept(e), set()).add(int(g))
    assert all(len(groups) == 1 for groups in by_concept.values())
    assert len(set().union(*by_concept.values())) == len(by_concept)
    assert emoji_ds.item_group[names.index(THUMBS_UP)] == emoji_ds.item_group[names.index(THUMBS_UP_MEDIUM)]
    for group in np.unique(emoji_ds.item_group):
        assert len(set(emoji_ds.item_split[emoji_ds.item_group == group])) == 1
    # skin-tone variants exist and are grouped: fewer groups than items
    assert len(by_concept) < 0.7 * len(names)


def test_shipped_load_is_deterministic(emoji_ds):
    builtin._cache.clear()
    again = load("emoji")
    assert again.images is not emoji_ds.images
    np.testing.assert_array_equal(again.images, emoji_ds.images)
    np.testing.assert_array_equal(again.item_split, emoji_ds.item_split)
    np.testing.assert_array_equal(again.item_group, emoji_ds.item_group)
    assert list(again.captions) == list(emoji_ds.captions)
    assert load("emoji").images is load("emoji").images  # cached and shared ...
    assert not load("emoji").images.flags.writeable  # ... so read-only


def test_split_and_summary_on_real_data(emoji_ds):
    val = load("emoji", split="val")
    assert isinstance(val, Dataset) and set(val.item_split) == {"val"}
    full_val = np.flatnonzero(emoji_ds.item_split == "val")
    assert val.num_items == len(full_val)
    np.testing.assert_array_equal(val.images, emoji_ds.images[full_val])
    for new, old in [(0, full_val[0]), (val.num_items - 1, full_val[-1])]:
        assert val.item_captions(new) == emoji_ds.item_captions(old)
    split_counts = {s: emoji_ds.split(s).num_items for s in ("train", "val", "test")}
    assert sum(split_counts.values()) == emoji_ds.num_items
    text = emoji_ds.summary(print_fn=None)
    assert f"{emoji_ds.num_items} items, {emoji_ds.num_captions} captions" in text
    for split, n in split_counts.items():
        assert any(line.split()[:2] == [split, str(n)] for line in text.splitlines())


def test_emoji_load_errors():
    with pytest.raises(ValueError, match="split must be None or one of .*got 'dev'"):
        load("emoji", split="dev")
    with pytest.raises(ValueError, match="image_root applies to Karpathy JSON and JSONL"):
        load("emoji", image_root="/tmp")


def test_top_level_name_and_missing_shipped_file(monkeypatch, tmp_path):
    import tfemde

    assert tfemde.load_dataset("emoji", split="test").num_items == int((load("emoji").item_split == "test").sum())
    monkeypatch.setattr(builtin, "EMOJI_PATH", tmp_path / "emoji.npz")
    with pytest.raises(FileNotFoundError, match=r"emoji\.npz not found \(the shipped data file is missing: rebuild "
                                                r"it with `tfemde data build-emoji`\)"):
        load("emoji")


def test_corrupt_emoji_file_is_named(tmp_path):
    bad = tmp_path / "bad.npz"
    with np.load(builtin.EMOJI_PATH, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["indices"] = arrays["indices"][:, :8]
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=r"bad\.npz: indices must be uint8 with shape"):
        load(bad)
    np.savez(bad, **{k: v for k, v in arrays.items() if k != "captions"})
    with pytest.raises(ValueError, match=r"bad\.npz: not an emoji data file; missing entries \['captions'\]"):
        load(bad)


# --------------------------------------------------------------------------------------------------- builder
def test_build_tiny_subset(tiny_build):
    path, stats = tiny_build
    assert stats["images"] == 5 and stats["skipped_wide"] == 1 and stats["skipped_missing"] == 1
    assert stats["groups"] == 4 and stats["captions"] >= 5
    ds = load(path)
    assert ds.name == "tiny" and ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
    assert list(ds.item_names) == [GRINNING, THUMBS_UP, THUMBS_UP_MEDIUM, FLAG_FR, FAMILY]
    assert ds.item_captions(0)[:2] == ["grinning face", "face, grin, grinning face"]
    assert "grinning" in ds.item_captions(0)  # the emoji package's alias
    assert ds.item_group[1] == ds.item_group[2] and len(set(ds.item_group)) == 4
    assert list(ds.item_split) == [expected_split(concept(e)) for e in ds.item_names]
    assert (ds.images[:, 0, 0] >= 250).all() and (ds.images.reshape(5, -1).min(axis=1) < 200).all()
    # the French flag is mostly blue, white and red
    flag = ds.images[3].reshape(-1, 3).astype(int)
    assert ((flag[:, 2] - flag[:, 0] > 80).sum() > 20) and ((flag[:, 0] - flag[:, 2] > 80).sum() > 20)


def test_build_matches_shipped_file(tmp_path, emoji_ds):
    """The builder reproduces the shipped file's pixels and captions for the same emoji."""
    path = tmp_path / "same.npz"
    build_emoji(path, size=64, emoji_subset=[GRINNING, THUMBS_UP_MEDIUM, FAMILY], progress=False)
    small = load(path)
    names = list(emoji_ds.item_names)
    for i, e in enumerate(small.item_names):
        j = names.index(e)
        np.testing.assert_array_equal(small.images[i], emoji_ds.images[j])
        assert small.item_captions(i) == emoji_ds.item_captions(j)


def test_build_lossless_and_palette_agree(tmp_path, tiny_build):
    lossless = tmp_path / "lossless.npz"
    build_emoji(lossless, size=32, emoji_subset=SUBSET[:3], palette=0, progress=False)
    with np.load(lossless, allow_pickle=False) as z:
        assert "pixels" in z.files and "indices" not in z.files
    exact, quantized = load(lossless).images, load(tiny_build[0]).images[:3]
    assert np.abs(exact.astype(int) - quantized).mean() < 3.0


def test_build_languages(tmp_path):
    path = tmp_path / "de.npz"
    build_emoji(path, size=16, langs=("en", "de"), emoji_subset=[GRINNING], progress=False)
    captions = load(path).item_captions(0)
    assert "grinning face" in captions and "grinsendes Gesicht" in captions
    with np.load(path, allow_pickle=False) as z:
        assert list(z["langs"]) == ["en", "de"]


def test_build_main_and_atomic_write(tmp_path, capsys):
    out = tmp_path / "sub" / "cli.npz"
    assert builder.main([str(out), "--size", "16", "--only", GRINNING, THUMBS_UP, "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out and load(out).num_items == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["cli.npz"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        build_emoji(tmp_path / "x.npz", font_path=tmp_path / "none.ttf", emoji_subset=[GRINNING], progress=False)
    assert not (tmp_path / "x.npz").exists()


def test_build_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="unicode-cldr-core"):
        build_emoji(tmp_path / "x.npz", cldr_dir=tmp_path, emoji_subset=[GRINNING], progress=False)
    with pytest.raises(ValueError, match="size must be a positive number of pixels; got 0"):
        build_emoji(tmp_path / "x.npz", size=0, progress=False)
    with pytest.raises(ValueError, match="palette must be 0 .* got 300"):
        build_emoji(tmp_path / "x.npz", palette=300, progress=False)
    with pytest.raises(ValueError, match="emoji_subset must hold emoji of the emoji package"):
        build_emoji(tmp_path / "x.npz", emoji_subset=["xy"], progress=False)


# ------------------------------------------------------------------------------------------- the Twemoji style
TWEMOJI_SVGS = __import__("pathlib").Path(__file__).with_name("data") / "twemoji"


@pytest.fixture(scope="module")
def two_styles():
    return load("emoji", styles=("noto", "twemoji"))


def test_twemoji_style_shares_concepts_captions_groups_and_splits(emoji_ds, two_styles):
    """Each Twemoji image is an item of its emoji's group and split with the emoji's captions; the Noto items come
    first, unchanged; the file is compact, documented and credited."""
    assert builtin.STYLE_PATHS["twemoji"].stat().st_size < 6 * 2**20
    notice = (builtin.BUILTIN_DIR / "NOTICE").read_text(encoding="utf-8")
    assert "CC-BY 4.0" in notice and "Twitter, Inc" in notice and "@twemoji/svg 15.0.0" in notice
    n = emoji_ds.num_items
    styles = two_styles.item_styles
    assert (styles[:n] == "noto").all() and (styles[n:] == "twemoji").all()
    assert 3000 < (styles == "twemoji").sum() <= n
    np.testing.assert_array_equal(two_styles.images[:n], emoji_ds.images)
    index = {e: i for i, e in enumerate(emoji_ds.item_names)}
    rng = np.random.default_rng(0)
    for item in rng.choice(np.arange(n, two_styles.num_items), size=200, replace=False):
        j = index[two_styles.item_names[item]]
        assert two_styles.item_group[item] == emoji_ds.item_group[j]
        assert two_styles.item_split[item] == emoji_ds.item_split[j] == expected_split(concept(emoji_ds.item_names[j]))
        assert two_styles.item_captions(item) == emoji_ds.item_captions(j)
        assert not np.array_equal(two_styles.images[item], emoji_ds.images[j])  # another artwork
    # no concept crosses splits, whatever its style
    for split in ("train", "val", "test"):
        groups = set(two_styles.item_group[two_styles.item_split == split])
        others = set(two_styles.item_group[two_styles.item_split != split])
        assert not groups & others
    twemoji_only = load("emoji", styles=("twemoji",), split="test")
    assert (twemoji_only.item_styles == "twemoji").all() and twemoji_only.num_captions > twemoji_only.num_items
    assert load("emoji").item_styles is None  # the default stays what the quickstart uses


def test_style_errors():
    with pytest.raises(ValueError, match="styles must be distinct names of noto, twemoji; got \\('noto', 'fluent'\\)"):
        load("emoji", styles=("noto", "fluent"))
    with pytest.raises(ValueError, match="styles must be distinct"):
        load("emoji", styles=("noto", "noto"))
    with pytest.raises(ValueError, match="styles applies to the built-in emoji set"):
        load(str(builtin.EMOJI_PATH), styles=("noto",))


def test_twemoji_builder_reproduces_the_shipped_images(tmp_path):
    """Ten of the package's SVG files (shipped for this test) rendered again give the shipped pixels exactly."""
    from tfemde.data.build_twemoji import build_twemoji, twemoji_file_names

    names, images = builtin.read_style_file("twemoji")
    names = [str(e) for e in names]
    files = {p.name for p in TWEMOJI_SVGS.glob("*.svg")}
    subset = [e for e in names if set(twemoji_file_names(e)) & files]
    assert len(subset) == 10
    stats = build_twemoji(tmp_path / "tw.npz", svg_dir=TWEMOJI_SVGS, emoji_subset=subset, progress=False)
    assert stats["images"] == 10 and stats["missing"] == 0
    rebuilt_names, rebuilt = builtin.read_style_file("twemoji", tmp_path / "tw.npz")
    for e, image in zip(rebuilt_names, rebuilt):
        np.testing.assert_array_equal(image, images[names.index(str(e))], err_msg=repr(e))
    assert twemoji_file_names("\u2764\ufe0f") == ["2764-fe0f.svg", "2764.svg"]
    with pytest.raises(ValueError, match="emoji_subset must hold emoji of the built-in set"):
        build_twemoji(tmp_path / "x.npz", svg_dir=TWEMOJI_SVGS, emoji_subset=["not an emoji"], progress=False)
    assert not (tmp_path / "x.npz").exists()


def test_build_emoji_command_makes_a_style_file(tmp_path, capsys):
    from tfemde.cli import main

    out = tmp_path / "tw.npz"
    assert main(["data", "build-emoji", str(out), "--style", "twemoji", "--svg-dir", str(TWEMOJI_SVGS)]) == 0
    names, images = builtin.read_style_file("twemoji", out)
    assert len(names) == 10 and images.shape == (10, 64, 64, 3)
    assert "wrote" in capsys.readouterr().out
    assert main(["data", "build-emoji", str(tmp_path / "x.npz"), "--svg-dir", str(TWEMOJI_SVGS)]) == 2
    assert "--svg-dir applies to --style twemoji only" in capsys.readouterr().err
    assert main(["data", "build-emoji", str(tmp_path / "x.npz"), "--style", "twemoji", "--langs", "de"]) == 2
    assert not (tmp_path / "x.npz").exists()
