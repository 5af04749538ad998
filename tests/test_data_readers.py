"""Readers for Karpathy split JSON, SCAN/VSE precomp folders and JSONL, on fixtures made here in tmp_path."""

import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from tfemde.data import DataWarning, StackedRows, load, read_jsonl, read_karpathy, read_precomp


def write_png(path, colour=(200, 30, 30), size=(8, 6), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


# ------------------------------------------------------------------------------------------------ Karpathy JSON
def karpathy_images():
    return [
        {"filename": "a.png", "filepath": "train2014", "split": "train", "imgid": 0,
         "sentences": [{"raw": "A red  square.", "tokens": ["a", "red", "square"]}, {"raw": "red box"}]},
        {"filename": "b.png", "filepath": "val2014", "split": "restval", "imgid": 1,
         "sentences": [{"raw": "a green square"}]},
        {"filename": "c.png", "filepath": "val2014", "split": "val", "imgid": 2,
         "sentences": [{"raw": "blue"}, {"tokens": ["a", "blue", "thing"]}]},
        {"filename": "d.png", "split": "test", "imgid": 3, "sentences": [{"raw": "black"}]},
        {"filename": "a.png", "filepath": "train2014", "split": "train", "imgid": 4,
         "sentences": [{"raw": "the same red square again"}]},
    ]


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "coco"
    for rel, colour in [("train2014/a.png", (255, 0, 0)), ("val2014/b.png", (0, 255, 0)),
                        ("val2014/c.png", (0, 0, 255)), ("d.png", (0, 0, 0))]:
        write_png(root / rel, colour)
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": karpathy_images(), "dataset": "coco"}), encoding="utf-8")
    return path


def write_karpathy(path, images):
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return path


def test_karpathy_reads_items_captions_splits(karpathy):
    ds = load(karpathy)
    assert ds.kind == "image_files" and ds.name == "dataset_coco" and ds.num_items == 5
    root = karpathy.parent
    assert list(ds.image_paths) == [str(root / "train2014/a.png"), str(root / "val2014/b.png"),
                                    str(root / "val2014/c.png"), str(root / "d.png"), str(root / "train2014/a.png")]
    assert all(os.path.isfile(p) for p in ds.image_paths)
    assert list(ds.item_split) == ["train", "train", "val", "test", "train"]  # restval -> train
    assert list(ds.captions) == ["A red square.", "red box", "a green square", "blue", "a blue thing", "black",
                                 "the same red square again"]
    np.testing.assert_array_equal(ds.caption_item, [0, 0, 1, 2, 2, 3, 4])
    assert list(ds.item_names) == ["train2014/a.png", "val2014/b.png", "val2014/c.png", "d.png", "train2014/a.png"]
    # the same image file twice: one group; otherwise distinct groups, stable across loads and splits
    assert ds.item_group[0] == ds.item_group[4] and len(set(ds.item_group[:4])) == 4
    train = load(karpathy, split="train")
    assert train.num_items == 3 and set(train.item_split) == {"train"}
    np.testing.assert_array_equal(train.item_group, ds.item_group[[0, 1, 4]])
    assert train.item_captions(1) == ["a green square"]


def test_karpathy_image_root(karpathy, tmp_path):
    elsewhere = write_karpathy(tmp_path / "split.json", karpathy_images())
    ds = read_karpathy(elsewhere, image_root=karpathy.parent, split="test")
    assert list(ds.image_paths) == [str(karpathy.parent / "d.png")]


def test_karpathy_missing_image_skipped_with_one_warning(karpathy):
    os.remove(karpathy.parent / "val2014/c.png")
    os.remove(karpathy.parent / "d.png")
    with pytest.warns(DataWarning, match=r"skipped 2 of 5 items whose image is missing or unreadable.*c\.png "
                                         r"\(missing\)") as record:
        ds = load(karpathy)
    assert len(record) == 1
    assert ds.num_items == 3 and list(ds.item_names) == ["train2014/a.png", "val2014/b.png", "train2014/a.png"]
    assert list(ds.captions) == ["A red square.", "red box", "a green square", "the same red square again"]
    np.testing.assert_array_equal(ds.caption_item, [0, 0, 1, 2])
    with pytest.raises(FileNotFoundError, match=r"image .*val2014/c\.png is missing \(2 of 5 images"):
        load(karpathy, strict=True)


def test_karpathy_unreadable_image(karpathy):
    (karpathy.parent / "val2014/b.png").write_bytes(b"this is not an image")
    Image.new("1", (9000, 5000)).save(karpathy.parent / "d.png")  # 45 megapixels in a few kB: over the limit
    with pytest.warns(DataWarning, match=r"skipped 2 of 5 .*b\.png \(not a readable image"):
        ds = load(karpathy)
    assert list(ds.item_names) == ["train2014/a.png", "val2014/c.png", "train2014/a.png"]
    with pytest.raises(ValueError, match=r"image .*val2014/b\.png is not a readable image"):
        load(karpathy, strict=True)
    with pytest.raises(ValueError, match=r"d\.png' is 9000 x 5000 = 45,000,000 pixels, more than the limit"):
        load(karpathy, strict=True, split="test")
    write_png(karpathy.parent / "d.png", fmt="TIFF")  # any format Pillow reads is decoded (training and serving)
    assert load(karpathy, strict=True, split="test").num_items == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(karpathy, check_images=False).num_items == 5  # existence only


@pytest.mark.parametrize("images, message", [
    ([{"filename": "a.png", "split": "train", "sentences": []}],
     r"images\[0\] \(a\.png\): sentences must be a non-empty list"),
    ([{"filename": "a.png", "split": "train"}], r"images\[0\] \(a\.png\): sentences must be a non-empty list"),
    ([{"filename": "a.png", "split": "train", "sentences": [{"raw": "  "}]}],
     r"images\[0\] \(a\.png\) sentences: every caption must be a non-empty string; got '  '"),
    ([{"filename": "a.png", "split": "train", "sentences": [{"imgid": 3}]}],
     r"images\[0\] \(a\.png\): sentences\[0\] needs a 'raw' string"),
    ([{"filename": "a.png", "split": "holdout", "sentences": [{"raw": "x"}]}],
     r"images\[0\] \(a\.png\): split must be one of 'train', 'restval', 'val', 'test'; got 'holdout'"),
    ([{"split": "train", "sentences": [{"raw": "x"}]}], r"images\[0\] must be an object with a 'filename' string"),
])
def test_karpathy_bad_entries(tmp_path, images, message):
    path = write_karpathy(tmp_path / "bad.json", images)
    with pytest.raises(ValueError, match=r"bad\.json: " + message):
        load(path)


def test_karpathy_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json' not found"):
        load(tmp_path / "nothere.json")
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"images": [{"filename": "caf\xe9.png"}]}')
    with pytest.raises(ValueError, match=r"latin1\.json: Karpathy split JSON must be UTF-8 text; line 1 has invalid "
                                         r"byte 0xe9"):
        load(path)
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"latin1\.json: not valid JSON \(line 1"):
        load(path)
    path.write_text('{"annotations": []}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"must be an object with an 'images' list; got dict with keys "
                                         r"\['annotations'\]"):
        load(path)
    with pytest.raises(ValueError, match="split must be None or one of 'train', 'val', 'test'; got 'restval'"):
        read_karpathy(path, split="restval")


# -------------------------------------------------------------------------------------------------------- JSONL
@pytest.fixture
def jsonl(tmp_path):
    folder = tmp_path / "mine"
    write_png(folder / "img" / "x.png")
    write_png(folder / "img" / "y.jpg", fmt="JPEG")
    write_png(folder / "img" / "z.png")
    lines = [{"image": "img/x.png", "captions": ["an x", "ex"], "split": "train", "group": "letters"},
             {"image": "img/y.jpg", "captions": ["a why"], "split": "train", "group": "letters"},
             {"image": "img/z.png", "captions": ["zed"], "split": "test"},
             {"image": "img/x.png", "captions": ["x again"], "split": "val", "group": 7}]
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" +
                    "\n".join(json.dumps(x) for x in lines[2:]) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_items(jsonl):
    ds = load(jsonl)
    assert ds.kind == "image_files" and ds.num_items == 4
    assert list(ds.image_paths) == [str(jsonl.parent / p) for p in ("img/x.png", "img/y.jpg", "img/z.png",
                                                                     "img/x.png")]
    assert list(ds.item_split) == ["train", "train", "test", "val"]
    assert list(ds.captions) == ["an x", "ex", "a why", "zed", "x again"]
    np.testing.assert_array_equal(ds.caption_item, [0, 0, 1, 2, 3])
    g = ds.item_group
    assert g[0] == g[1] and len({g[0], g[2], g[3]}) == 3  # explicit groups; without one, the image's own group
    assert load(jsonl, split="test").item_names.tolist() == ["img/z.png"]
    for name in ("x.png", "y.jpg", "z.png"):
        write_png(jsonl.parent / "copy" / "img" / name, fmt="PNG")
    other_root = read_jsonl(jsonl, image_root=jsonl.parent / "copy")
    assert other_root.image_paths[0] == str(jsonl.parent / "copy" / "img/x.png")
    with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl: all 4 images are missing or unreadable, e\.g\. "
                                                r"/data/elsewhere/img/x\.png \(missing\); is image_root right\?"):
        read_jsonl(jsonl, image_root="/data/elsewhere")


def test_jsonl_missing_image(jsonl):
    os.remove(jsonl.parent / "img" / "z.png")
    with pytest.warns(DataWarning, match=r"pairs\.jsonl: skipped 1 of 4 items .*z\.png \(missing\)"):
        assert load(jsonl).num_items == 3
    with pytest.raises(FileNotFoundError, match=r"pairs\.jsonl: image .*img/z\.png is missing"):
        load(jsonl, strict=True)


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "captions": [], "split": "train"}', r"line 2: captions must be a non-empty list"),
    ('{"image": "a.png", "captions": "a cat", "split": "train"}', r"line 2: captions must be a non-empty list"),
    ('{"image": "a.png", "captions": ["ok", 3], "split": "train"}', r"line 2: every caption must be a non-empty"),
    ('{"image": "a.png", "captions": ["x"], "split": "holdout"}', r"line 2: split must be one of .*got 'holdout'"),
    ('{"image": "a.png", "captions": ["x"]}', r"line 2: split must be one of .*got None"),
    ('{"captions": ["x"], "split": "train"}', r"line 2: 'image' must be a non-empty path string"),
    ('{"image": "a.png", "caption": ["x"], "split": "train"}', r"line 2: unknown keys \['caption'\]"),
    ('{"image": "a.png", "captions": ["x"], "split": "train", "group": [1]}', r"line 2: group must be a string"),
    ('{"image": "a.png", "captions": ["x"], "split": "train"', r"line 2 is not valid JSON"),
    ('["a.png", ["x"]]', r"line 2 must be a JSON object; got list"),
])
def test_jsonl_bad_lines(tmp_path, line, message):
    write_png(tmp_path / "a.png")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "captions": ["fine"], "split": "train"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: " + message):
        load(path)


def test_jsonl_many_images_checked_in_threads(tmp_path):
    lines = []
    for i in range(70):
        if i != 33:
            write_png(tmp_path / f"{i}.png", colour=(i, 0, 0))
        lines.append(json.dumps({"image": f"{i}.png", "captions": [f"image {i}"], "split": "train"}))
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    with pytest.warns(DataWarning, match=r"skipped 1 of 70 items .*33\.png \(missing\)"):
        ds = load(path)
    assert ds.num_items == 69 and "33.png" not in set(ds.item_names)
    assert ds.item_captions(33) == ["image 34"]
    with pytest.raises(ValueError, match=r"many\.jsonl: no items in split 'val'; the file has splits \['train'\]"):
        load(path, split="val")


def test_jsonl_bad_files(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes('{"image": "a.png", "captions": ["fine"], "split": "train"}\n'.encode() + b'{"x": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: JSONL file must be UTF-8 text; line 2 has invalid byte 0xff"):
        load(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl: no items"):
        load(path)


# ------------------------------------------------------------------------------------------------------ precomp
def make_split(folder, name, n_images, regions=3, features=4, repeat=1, ids=None, seed=0, dtype=np.float32):
    """Writes {name}_ims.npy / _caps.txt (/ _ids.txt); returns the per-image features [n, R, F] and captions."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_images, regions, features)).astype(dtype)
    np.save(folder / f"{name}_ims.npy", np.repeat(feats, repeat, axis=0))
    captions = [f"{name} image {i} caption {k}" for i in range(n_images) for k in range(5)]
    (folder / f"{name}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    if ids is not None:
        (folder / f"{name}_ids.txt").write_text("\n".join(map(str, ids)) + "\n", encoding="utf-8")
    return feats, captions


@pytest.fixture
def precomp(tmp_path):
    folder = tmp_path / "f30k_precomp"
    folder.mkdir()
    parts = {"train": make_split(folder, "train", 4, seed=1), "dev": make_split(folder, "dev", 2, seed=2),
             "test": make_split(folder, "test", 3, seed=3, ids=[101, 102, 103])}
    return folder, parts


def test_precomp_all_splits(precomp):
    folder, parts = precomp
    ds = load(folder)
    assert ds.kind == "regions" and ds.num_items == 9 and ds.num_captions == 45
    assert isinstance(ds.regions, StackedRows) and ds.regions.shape == (9, 3, 4)
    assert all(isinstance(p, np.memmap) and p.mode == "r" for p in ds.regions.parts)
    assert list(ds.item_split) == ["train"] * 4 + ["val"] * 2 + ["test"] * 3
    assert list(ds.captions) == parts["train"][1] + parts["dev"][1] + parts["test"][1]
    np.testing.assert_array_equal(ds.caption_item, np.arange(45) // 5)  # caption c -> image c // 5
    expected = np.concatenate([parts[s][0] for s in ("train", "dev", "test")])
    items = np.array([8, 0, 5, 3])
    np.testing.assert_array_equal(ds.region_features(items), expected[items])
    assert list(ds.item_names[:2]) == ["train:0", "train:1"] and list(ds.item_names[6:]) == ["101", "102", "103"]
    assert len(set(ds.item_group)) == 9
    test = ds.split("test")
    np.testing.assert_array_equal(test.region_features([2, 0]), parts["test"][0][[2, 0]])


def test_precomp_single_split_is_one_memory_map(precomp):
    folder, parts = precomp
    for split, file in [("val", "dev"), ("dev", "dev"), ("train", "train")]:
        ds = read_precomp(folder, split=split)
        assert isinstance(ds.regions, np.memmap) and ds.regions.mode == "r"
        assert set(ds.item_split) == {"val" if file == "dev" else "train"}
        np.testing.assert_array_equal(ds.region_features(np.arange(ds.num_items)), parts[file][0])


def test_precomp_repeated_rows_release(tmp_path):
    feats, captions = make_split(tmp_path, "train", 3, repeat=5, ids=[7] * 5 + [8] * 5 + [9] * 5)
    with pytest.warns(DataWarning, match=r"train_ims\.npy: 15 image rows for 15 captions: this release repeats "
                                         r"each image 5x; using every 5th row \(3 images\)"):
        ds = load(tmp_path, split="train")
    assert ds.num_items == 3 and ds.regions.shape == (15, 3, 4)
    np.testing.assert_array_equal(ds.region_rows, [0, 5, 10])
    np.testing.assert_array_equal(ds.region_features([2, 1, 0]), feats[[2, 1, 0]])
    np.testing.assert_array_equal(ds.caption_item, np.arange(15) // 5)
    assert list(ds.item_names) == ["7", "8", "9"]


def test_precomp_rows_equal_captions_but_not_repeated(tmp_path):
    make_split(tmp_path, "train", 3)
    np.save(tmp_path / "train_ims.npy", np.arange(15 * 2 * 2, dtype=np.float32).reshape(15, 2, 2))
    with pytest.raises(ValueError, match=r"train_ims\.npy: 15 image rows for 15 captions in train_caps\.txt, but the "
                                         r"rows are not runs of 5 repeated images"):
        load(tmp_path)


def test_precomp_prefers_testall(tmp_path):
    make_split(tmp_path, "test", 1, seed=1)
    all_feats, _ = make_split(tmp_path, "testall", 5, seed=2)
    ds = load(tmp_path)
    assert ds.num_items == 5 and set(ds.item_split) == {"test"}
    np.testing.assert_array_equal(ds.region_features(np.arange(5)), all_feats)
    assert load(tmp_path, split="test").num_items == 5
    assert load(tmp_path, split="testall").num_items == 5


@pytest.mark.parametrize("mutate, error, message", [
    (lambda f: (f / "train_caps.txt").write_text("a\n" * 12, encoding="utf-8"), ValueError,
     r"train_caps\.txt: 12 captions is not a multiple of 5"),
    (lambda f: (f / "train_caps.txt").write_text("a\n" * 10, encoding="utf-8"), ValueError,
     r"train_ims\.npy: 4 image rows do not match 10 captions in train_caps\.txt; expected 2 rows"),
    (lambda f: (f / "train_caps.txt").write_bytes(b"ok\n" * 7 + b"caf\xe9\n" + b"ok\n" * 12), ValueError,
     r"train_caps\.txt: caption file must be UTF-8 text; line 8 has invalid byte 0xe9"),
    (lambda f: (f / "train_caps.txt").write_text("a\n" * 5 + "\n" + "a\n" * 14, encoding="utf-8"), ValueError,
     r"train_caps\.txt: line 6 is an empty caption"),
    (lambda f: np.save(f / "train_ims.npy", np.zeros((4, 12), np.float32)), ValueError,
     r"train_ims\.npy: region features must have shape \[images, regions, features\]; got shape \(4, 12\)"),
    (lambda f: np.save(f / "train_ims.npy", np.zeros((4, 3, 4), np.int64)), ValueError,
     r"train_ims\.npy: region features must be a float array \(float32\); got dtype int64"),
    (lambda f: np.save(f / "train_ims.npy", np.array([None] * 4, dtype=object)), ValueError,
     r"train_ims\.npy: not a readable \.npy array"),
    (lambda f: (f / "train_ims.npy").write_bytes(b"garbage"), ValueError, r"train_ims\.npy: not a readable \.npy"),
    (lambda f: os.remove(f / "train_ims.npy"), FileNotFoundError, r"region features .*train_ims\.npy not found"),
    (lambda f: os.remove(f / "train_caps.txt"), FileNotFoundError, r"caption file .*train_caps\.txt not found"),
    (lambda f: (f / "train_ids.txt").write_text("1\n2\n3\n", encoding="utf-8"), ValueError,
     r"train_ids\.txt: 3 ids do not match 4 images of train_ims\.npy"),
    (lambda f: np.save(f / "dev_ims.npy", np.zeros((2, 3, 5), np.float32)), ValueError,
     r"dev_ims\.npy: region features of shape \(2, 3, 5\) do not stack with train_ims\.npy of shape \(4, 3, 4\)"),
])
def test_precomp_bad_inputs(precomp, mutate, error, message):
    folder, _ = precomp
    mutate(folder)
    with pytest.raises(error, match=message):
        load(folder)


def test_precomp_splits_and_folders(precomp, tmp_path):
    folder, _ = precomp
    with pytest.raises(ValueError, match="split must be None or one of 'train', 'val', 'test', 'dev', 'testall'; "
                                         "got 'restval'"):
        load(folder, split="restval")
    with pytest.raises(FileNotFoundError, match=r"no testall_caps\.txt / testall_ims\.npy for split='testall'"):
        load(folder, split="testall")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no precomp files for any split; found none"):
        load(tmp_path / "empty")
    make_split(tmp_path / "empty", "train", 1)
    with pytest.raises(FileNotFoundError, match=r"no precomp files for split='test' \(files testall_caps\.txt or "
                                                r"test_caps\.txt\); found \['train'\]"):
        load(tmp_path / "empty", split="test")
    make_split(folder, "extra", 1)
    with pytest.warns(DataWarning, match=r"ignored files of unknown split names \['extra'\]"):
        assert load(folder).num_items == 9
    with pytest.raises(ValueError, match="image_root applies to Karpathy JSON and JSONL sources only"):
        load(folder, image_root=folder)


def test_stacked_rows():
    a = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    b = -np.arange(3 * 2 * 3, dtype=np.float32).reshape(3, 2, 3)
    rows, whole = StackedRows([a, b]), np.concatenate([a, b])
    assert rows.shape == (5, 2, 3) and len(rows) == 5 and rows.dtype == np.float32 and rows.ndim == 3
    np.testing.assert_array_equal(rows[3], whole[3])
    np.testing.assert_array_equal(rows[-1], whole[-1])
    np.testing.assert_array_equal(rows[1:4], whole[1:4])
    np.testing.assert_array_equal(rows[[4, 0, 2, 2]], whole[[4, 0, 2, 2]])
    np.testing.assert_array_equal(rows[np.array([3, 1]), 1], whole[[3, 1], 1])
    np.testing.assert_array_equal(np.asarray(rows), whole)
    with pytest.raises(IndexError, match="row 5 out of range for 5 rows"):
        rows[5]
    with pytest.raises(IndexError, match="out of range for 5 rows"):
        rows[[0, 7]]
    with pytest.raises(ValueError, match="StackedRows parts must share trailing shape and dtype"):
        StackedRows([a, b[:, :1]])


# --------------------------------------------------------------------------------------------------- dispatch
def test_load_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data source 'nope' not found; expected 'emoji', a Karpathy"):
        load("nope")
    (tmp_path / "data.csv").write_text("image,caption\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv: unknown data source type '\.csv'"):
        load(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="split must be None or one of 'train', 'val', 'test'; got 'everything'"):
        load("emoji", split="everything")


# ------------------------------------------------------------------------------------------------ caption parts
def test_caption_parts_add_each_listed_part_once_to_its_own_item_in_one_split():
    from tfemde.data import Dataset

    data = Dataset(name="kw", captions=["cat", "bone, meat, meat on bone", "red, blue", "meat on bone", " , dog,dog"],
                   caption_item=[2, 0, 1, 0, 0], item_split=["train", "val", "train"], item_group=[0, 1, 2],
                   images=np.zeros((3, 4, 4, 3), np.uint8), item_names=["a", "b", "c"])
    parts = data.with_caption_parts()
    assert [(int(i), c) for i, c in zip(parts.caption_item, parts.captions)] == [
        (0, "bone, meat, meat on bone"), (0, "meat on bone"), (0, " , dog,dog"), (0, "bone"), (0, "meat"), (0, "dog"),
        (1, "red, blue"),  # a val item: unchanged
        (2, "cat")]
    assert list(parts.item_names) == ["a", "b", "c"] and parts.images is data.images
    assert data.num_captions == 5, "the data set it came from is unchanged"
    val_parts = data.with_caption_parts("val")
    assert val_parts.item_captions(1) == ["red, blue", "red", "blue"]
    assert val_parts.item_captions(0) == data.item_captions(0)
    plain = data.split("train").subset([1])  # "cat": nothing to add
    assert plain.with_caption_parts() is plain
    with pytest.raises(ValueError, match="split must be one of .*'dev'"):
        data.with_caption_parts("dev")
    with pytest.raises(ValueError, match="separator must be a non-blank string; got ' '"):
        data.with_caption_parts(separator=" ")
