"""Tests of tfemde.data.pipelines: batch contents, augmentations, determinism, epochs, evaluation order, laziness."""

import numpy as np
import pytest
import tensorflow as tf
import sentencepiece as spm
from PIL import Image

from tfemde.data import Dataset, EvalData, caption_text_ids, eval_dataset, train_dataset
from tfemde.text import MASK_ID, Tokenizer

WORDS = "a the red blue green small big dog cat bird tree car house on in near with running sitting".split()
N_ITEMS, SIZE, R, F = 12, 8, 6, 5


def _captions(num_items, rng, per_item=(1, 4)):
    captions, caption_item = [], []
    for item in range(num_items):
        for _ in range(rng.integers(*per_item)):
            captions.append(" ".join(rng.choice(WORDS, size=rng.integers(2, 14))))
            caption_item.append(item)
    return captions, np.array(caption_item)


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(7)
    captions, caption_item = _captions(N_ITEMS, rng)
    captions[5], captions[9] = captions[0].upper(), captions[2].replace(" ", "  ")  # equal texts of other items
    return dict(
        captions=captions, caption_item=caption_item,
        item_split=np.array(["train"] * 8 + ["val"] * 2 + ["test"] * 2),
        item_group=np.arange(N_ITEMS) // 2 + 100,
        images=rng.integers(0, 256, size=(N_ITEMS, SIZE, SIZE, 3), dtype=np.uint8),
        regions=rng.normal(size=(N_ITEMS, R, F)).astype(np.float32),
    )


@pytest.fixture(scope="module")
def tokenizer(parts):
    return Tokenizer.train(parts["captions"] * 3, vocab_size=36)


@pytest.fixture(scope="module")
def image_files(parts, tmp_path_factory):
    """PNG files (RGB, and RGBA with transparency for every third item) holding the same pixels as `images`."""
    folder = tmp_path_factory.mktemp("images")
    paths, expected = [], []
    rng = np.random.default_rng(3)
    for i, pixels in enumerate(parts["images"]):
        path = folder / f"{i:03d}.png"
        if i % 3 == 0:
            alpha = rng.integers(0, 256, size=pixels.shape[:2] + (1,), dtype=np.uint8)
            Image.fromarray(np.concatenate([pixels, alpha], axis=-1), "RGBA").save(path)
            a = alpha.astype(np.float64) / 255.0
            expected.append(np.clip(np.round(pixels * a + 255.0 * (1.0 - a)), 0, 255).astype(np.uint8))
        else:
            Image.fromarray(pixels).save(path)
            expected.append(pixels)
        paths.append(str(path))
    return np.array(paths), np.stack(expected)


@pytest.fixture(scope="module")
def region_file(parts, tmp_path_factory):
    path = tmp_path_factory.mktemp("regions") / "train_ims.npy"
    np.save(path, parts["regions"])
    return path


def _make(parts, kind, image_files=None, region_file=None, **extra):
    common = {k: parts[k] for k in ("captions", "caption_item", "item_split", "item_group")}
    common.update(extra)
    if kind == "images":
        return Dataset("mem", images=parts["images"], **common)
    if kind == "image_files":
        return Dataset("files", image_paths=image_files[0], **common)
    return Dataset("precomp", regions=np.load(region_file, mmap_mode="r"), **common)


@pytest.fixture(params=["images", "image_files", "regions"])
def kind_dataset(request, parts, image_files, region_file):
    return request.param, _make(parts, request.param, image_files, region_file)


def _epoch(ds):
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


def _reference_ids(tokenizer, texts, max_length):
    """Independent encoding: the sentencepiece library, truncated and padded in Python."""
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    ids = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
        pieces = sp.encode(text)[:max_length]
        ids[row, :len(pieces)] = pieces
    return ids


# ---------------------------------------------------------------------------------------------- contents
def test_batch_shapes_dtypes_and_contents(kind_dataset, parts, tokenizer, image_files):
    kind, ds = kind_dataset
    train = train_dataset(ds, tokenizer, batch_size=5, max_length=9, image_size=SIZE, caption_augment=0.0,
                          image_augment=False, region_drop=0.0)
    spec = train.element_spec
    want_keys = {"caption_ids", "caption_mask", "image_id", "group_id", "caption_id", "text_id"}
    want_keys |= {"image"} if kind != "regions" else {"regions", "region_mask"}
    assert set(spec) == want_keys
    assert spec["caption_ids"].shape == (5, 9) and spec["caption_ids"].dtype.name == "int32"
    assert spec["caption_mask"].shape == (5, 9) and spec["caption_mask"].dtype.name == "bool"
    for key in ("image_id", "group_id", "caption_id", "text_id"):
        assert spec[key].shape == (5,) and spec[key].dtype.name == "int64"
    if kind == "regions":
        assert spec["regions"].shape == (5, R, F) and spec["regions"].dtype.name == "float32"
        assert spec["region_mask"].shape == (5, R) and spec["region_mask"].dtype.name == "bool"
    else:
        assert spec["image"].shape == (5, SIZE, SIZE, 3) and spec["image"].dtype.name == "float32"

    pixels = parts["images"] if kind == "images" else image_files[1]
    for batch in _epoch(train):
        c, i = batch["caption_id"], batch["image_id"]
        np.testing.assert_array_equal(i, parts["caption_item"][c])
        np.testing.assert_array_equal(batch["group_id"], parts["item_group"][i])
        texts = [" ".join(parts["captions"][k].lower().split()) for k in c]
        same_text = np.array([[a == b for b in texts] for a in texts])
        np.testing.assert_array_equal(batch["text_id"][:, None] == batch["text_id"][None, :], same_text)
        np.testing.assert_array_equal(batch["caption_ids"],
                                      _reference_ids(tokenizer, [parts["captions"][k] for k in c], 9))
        np.testing.assert_array_equal(batch["caption_mask"], batch["caption_ids"] > 0)
        if kind == "regions":
            np.testing.assert_array_equal(batch["regions"], parts["regions"][i])
            assert batch["region_mask"].all()
        else:
            np.testing.assert_allclose(batch["image"], pixels[i].astype(np.float32) / 255.0, atol=1e-7)


def test_caption_text_ids_equal_for_equal_texts_only():
    ids = caption_text_ids(["Red heart", "red  heart ", "red hearts", "flag", "FLAG", "ﬂag"])
    assert ids.dtype == np.int64 and ids.shape == (6,)
    assert ids[0] == ids[1] and ids[3] == ids[4]
    assert len({ids[0], ids[2], ids[3]}) == 3 and ids[5] == ids[3]  # full case folding maps the ligature to "fl"


def test_masks_match_caption_lengths(parts, tokenizer):
    ds = _make(parts, "images")
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    for max_length in (3, 40):
        for batch in _epoch(train_dataset(ds, tokenizer, 4, max_length=max_length, caption_augment=0.0)):
            lengths = [min(len(sp.encode(parts["captions"][c])), max_length) for c in batch["caption_id"]]
            want = np.arange(max_length)[None, :] < np.array(lengths)[:, None]
            np.testing.assert_array_equal(batch["caption_mask"], want)


def test_every_pair_once_per_epoch_and_reshuffled(parts, tokenizer):
    ds = _make(parts, "images")
    m = ds.num_captions
    batch_size = 4
    train = train_dataset(ds, tokenizer, batch_size=batch_size, seed=3)
    epochs = [np.concatenate([b["caption_id"] for b in _epoch(train)]) for _ in range(2)]
    full = m - m % batch_size
    for seen in epochs:
        assert len(seen) == full and len(np.unique(seen)) == full
    if m % batch_size == 0:
        np.testing.assert_array_equal(np.sort(epochs[0]), np.arange(m))
    assert not np.array_equal(epochs[0], epochs[1])

    whole = train_dataset(ds, tokenizer, batch_size=1, shuffle=False, caption_augment=0.0)
    ordered = np.concatenate([b["caption_id"] for b in _epoch(whole)])
    np.testing.assert_array_equal(ordered, np.arange(m))

    endless = train_dataset(ds, tokenizer, batch_size=batch_size, repeat=True)
    seen = np.concatenate([b["caption_id"] for b in _epoch(endless.take(m))])  # m batches = batch_size epochs
    assert np.array_equal(np.bincount(seen, minlength=m), np.full(m, batch_size))


@pytest.mark.parametrize("width", [2, 5])
def test_length_buckets_pad_each_batch_to_a_multiple_of_the_width(parts, tokenizer, width):
    """Batches of captions of about the same length, each padded only to the next multiple of `width` (at most
    `max_length`), the ids those of the unbucketed encoding; as many whole batches per epoch as without buckets, every
    caption at most once, reshuffled each epoch. (That padding changes no output: test_models'
    test_outputs_do_not_change_with_padding.)"""
    ds = _make(parts, "images")
    batch_size, max_length = 3, 9
    reference = _reference_ids(tokenizer, parts["captions"], max_length)
    lengths = (reference > 0).sum(axis=1)
    train = train_dataset(ds, tokenizer, batch_size=batch_size, max_length=max_length, caption_augment=0.0, seed=1,
                          bucket_width=width)
    assert int(train.cardinality()) == ds.num_captions // batch_size
    epochs = []
    for _ in range(2):
        seen, mixed = [], 0
        for batch in _epoch(train):
            caption = batch["caption_id"]
            length = batch["caption_ids"].shape[1]
            assert length == min(max_length, -(-lengths[caption].max() // width) * width)
            np.testing.assert_array_equal(batch["caption_ids"], reference[caption, :length])
            np.testing.assert_array_equal(batch["caption_mask"], reference[caption, :length] > 0)
            np.testing.assert_array_equal(batch["image_id"], parts["caption_item"][caption])
            buckets = -(-np.minimum(lengths[caption], max_length) // width)
            mixed += buckets.min() != buckets.max()
            seen.append(caption)
        seen = np.concatenate(seen)
        assert len(seen) == ds.num_captions // batch_size * batch_size and len(np.unique(seen)) == len(seen)
        assert mixed <= len(np.unique(-(-np.minimum(lengths, max_length) // width))) - 1  # only at bucket edges
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])
    endless = train_dataset(ds, tokenizer, batch_size=batch_size, bucket_width=width, repeat=True)
    assert int(endless.cardinality()) == tf.data.INFINITE_CARDINALITY
    assert len(_epoch(endless.take(3 * len(epochs[0]) // batch_size))) == 3 * len(epochs[0]) // batch_size


def test_balanced_groups_draw_every_group_equally_often(parts, tokenizer):
    """balance_groups: each epoch has as many batches as without it, of pairs drawn with every group equally likely
    whatever its number of items and captions (the fixture's groups hold 2 to 7 captions); new draws every epoch."""
    ds = _make(parts, "images")
    caption_group = parts["item_group"][parts["caption_item"]]
    groups, captions_per_group = np.unique(caption_group, return_counts=True)
    assert captions_per_group.max() >= 2 * captions_per_group.min()
    batch_size = 3
    train = train_dataset(ds, tokenizer, batch_size=batch_size, seed=5, balance_groups=True, bucket_width=2)
    epochs = [_epoch(train) for _ in range(2)]
    assert {len(e) for e in epochs} == {ds.num_captions // batch_size} == {int(train.cardinality())}
    for batch in epochs[0]:
        np.testing.assert_array_equal(batch["image_id"], parts["caption_item"][batch["caption_id"]])
    endless = train_dataset(ds, tokenizer, batch_size=ds.num_captions, seed=5, balance_groups=True, repeat=True)
    drawn = np.concatenate([b["caption_id"] for b in _epoch(endless.take(12_000 // ds.num_captions))])
    share = np.array([(caption_group[drawn] == g).mean() for g in groups])
    np.testing.assert_allclose(share, 1.0 / len(groups), rtol=0.1)  # ~ 12k draws: 3 sigma is about 7 %
    # within a group, its captions equally likely
    first = groups[np.argmax(captions_per_group)]
    within = np.bincount(drawn[caption_group[drawn] == first], minlength=ds.num_captions)[caption_group == first]
    np.testing.assert_allclose(within / within.sum(), 1.0 / len(within), rtol=0.25)
    assert not np.array_equal(epochs[0][0]["caption_id"], epochs[1][0]["caption_id"])
    with pytest.raises(ValueError, match="balance_groups=True draws pairs at random, so it needs shuffle=True"):
        train_dataset(ds, tokenizer, batch_size=2, balance_groups=True, shuffle=False)
    with pytest.raises(ValueError, match="balance_groups must be True or False; got 1"):
        train_dataset(ds, tokenizer, batch_size=2, balance_groups=1)


def _all_equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_deterministic_given_seed(kind_dataset, tokenizer):
    kind, ds = kind_dataset

    def run(seed, epochs=2, **kwargs):
        train = train_dataset(ds, tokenizer, batch_size=5, seed=seed, image_size=SIZE, region_drop=0.5,
                              caption_augment=0.5, **kwargs)
        return [batch for _ in range(epochs) for batch in _epoch(train)]

    first, second, other = run(1), run(1), run(2, epochs=1)
    assert _all_equal(first, second)
    half = len(first) // 2
    assert not _all_equal(first[:half], other)
    assert not _all_equal(first[:half], first[half:])  # the second epoch is reshuffled and re-augmented
    if kind == "images":  # the augmentation streams differ across seeds too, not only the order
        no_shuffle = [run(s, epochs=1, shuffle=False) for s in (1, 2)]
        assert [b["caption_id"].tolist() for b in no_shuffle[0]] == [b["caption_id"].tolist() for b in no_shuffle[1]]
        assert not _all_equal(*no_shuffle)


def test_pipelines_run_without_tf_data_autotuning(kind_dataset, tokenizer):
    # An autotuned iterator stalls fit for ~20 s at epoch boundaries (pipeline_options; benchmarks/pipeline.py
    # --epoch-gaps), so every pipeline a user gets must have autotuning off and a deterministic order.
    _, ds = kind_dataset
    evaluation = eval_dataset(ds, tokenizer, batch_size=4, image_size=SIZE)
    for pipeline in (train_dataset(ds, tokenizer, batch_size=5, image_size=SIZE), evaluation.items,
                     evaluation.captions):
        options = pipeline.options()
        assert options.autotune.enabled is False
        assert options.deterministic is True


# ---------------------------------------------------------------------------------------------- augmentations
def _regions_dataset(num_items, num_regions, captions_per_item=2):
    rng = np.random.default_rng(0)
    return Dataset("drop", captions=["a red dog"] * (num_items * captions_per_item),
                   caption_item=np.repeat(np.arange(num_items), captions_per_item),
                   item_split=["train"] * num_items, item_group=np.arange(num_items),
                   regions=rng.normal(size=(num_items, num_regions, 2)).astype(np.float32))


def test_region_drop_rate_and_never_all_dropped(tokenizer):
    ds = _regions_dataset(100, 36)
    masks = np.concatenate([b["region_mask"] for b in _epoch(train_dataset(ds, tokenizer, 50, repeat=True,
                                                                           caption_augment=0.0).take(8))])
    # 400 rows x 36 regions; std of the drop rate is sqrt(0.16 / 14400) = 0.0033
    assert abs(1.0 - masks.mean() - 0.2) < 0.015
    assert masks.any(axis=1).all()

    heavy = np.concatenate([b["region_mask"] for b in _epoch(train_dataset(ds, tokenizer, 50, region_drop=0.97,
                                                                           caption_augment=0.0))])
    kept = heavy.sum(axis=1)
    assert kept.min() == 1 and (kept == 1).mean() > 0.2  # 0.97^36 = 0.33 of the rows needed the keep-one rule
    total = np.concatenate([b["region_mask"] for b in _epoch(train_dataset(ds, tokenizer, 50, region_drop=1.0))])
    np.testing.assert_array_equal(total.sum(axis=1), 1)
    none = np.concatenate([b["region_mask"] for b in _epoch(train_dataset(ds, tokenizer, 50, region_drop=0.0))])
    assert none.all()


def test_caption_augmentation_rates(tokenizer):
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(WORDS, size=6)) for _ in range(400)]
    ds = Dataset("caps", captions=captions, caption_item=np.arange(400), item_split=["train"] * 400,
                 item_group=np.arange(400), images=np.zeros((400, 2, 2, 3), np.uint8))
    max_length = 64
    p = 0.5
    n_tokens = n_kept = n_mask = 0
    normal = set(tokenizer.normal_ids.tolist())
    for batch in _epoch(train_dataset(ds, tokenizer, 100, max_length=max_length, caption_augment=p,
                                      image_augment=False)):
        np.testing.assert_array_equal(batch["caption_mask"], batch["caption_ids"] > 0)
        for c, ids, mask in zip(batch["caption_id"], batch["caption_ids"], batch["caption_mask"]):
            original = sp.encode(captions[c])
            assert len(original) < max_length  # nothing truncated, so counts are exact
            got = ids[mask]
            n_tokens += len(original)
            n_kept += len(got)
            n_mask += int((got == MASK_ID).sum())
            assert set(got.tolist()) <= normal | {MASK_ID}
    # selected with p; of those 50% masked, 10% replaced, 40% deleted
    assert abs(n_mask / n_tokens - 0.5 * p) < 0.03
    assert abs(1.0 - n_kept / n_tokens - 0.4 * p) < 0.03


def test_caption_augmentation_keeps_tokens_order_and_never_empties(tokenizer):
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    captions = ["dog", "cat", "a", "red"] * 50
    ds = Dataset("short", captions=captions, caption_item=np.arange(200), item_split=["train"] * 200,
                 item_group=np.arange(200), images=np.zeros((200, 2, 2, 3), np.uint8))
    for batch in _epoch(train_dataset(ds, tokenizer, 50, max_length=4, caption_augment=1.0, image_augment=False)):
        assert batch["caption_mask"].any(axis=1).all()


def test_caption_augmentation_keeps_order_of_unchanged_tokens():
    import tensorflow as tf

    from tfemde.data.augmentation import augment_captions

    rng = np.random.default_rng(2)
    rows = [list(rng.integers(3, 30, size=rng.integers(0, 12))) for _ in range(300)]
    tokens = tf.ragged.constant(rows, dtype=tf.int32)
    sentinel = 999  # the only "random token", so replacements are recognisable
    out = augment_captions(tokens, tf.constant([4, 2], tf.int64), 0.5, MASK_ID, tf.constant([sentinel]))
    n = n_mask = n_replaced = n_kept = 0
    for original, got in zip(rows, out.to_list()):
        assert len(got) <= len(original) and (len(got) > 0) == (len(original) > 0)
        unchanged = [t for t in got if t not in (MASK_ID, sentinel)]
        it = iter(original)
        assert all(any(t == o for o in it) for t in unchanged)  # a subsequence of the original
        n += len(original)
        n_mask += got.count(MASK_ID)
        n_replaced += got.count(sentinel)
        n_kept += len(got)
    assert abs(n_mask / n - 0.25) < 0.04 and abs(n_replaced / n - 0.05) < 0.02 and abs(1 - n_kept / n - 0.2) < 0.04


def test_image_augmentation(parts, tokenizer):
    ds = _make(parts, "images")
    pixels = parts["images"].astype(np.float32) / 255.0

    flip_only = _epoch(train_dataset(ds, tokenizer, 4, crop_scale=1.0, flip=True, repeat=True).take(10))
    flipped = []
    for batch in flip_only:
        for image, item in zip(batch["image"], batch["image_id"]):
            same = np.allclose(image, pixels[item], atol=1e-6)
            mirror = np.allclose(image, pixels[item][:, ::-1], atol=1e-6)
            assert same or mirror
            flipped.append(mirror and not same)
    assert 0.2 < np.mean(flipped) < 0.8

    for batch in _epoch(train_dataset(ds, tokenizer, 4, crop_scale=1.0, flip=False)):
        np.testing.assert_allclose(batch["image"], pixels[batch["image_id"]], atol=1e-6)

    cropped = _epoch(train_dataset(ds, tokenizer, 4, crop_scale=0.5, flip=False))
    changed = 0
    for batch in cropped:
        assert batch["image"].shape == (4, SIZE, SIZE, 3)
        assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
        changed += sum(not np.allclose(x, pixels[i], atol=1e-3) for x, i in zip(batch["image"], batch["image_id"]))
    assert changed > 0


def test_in_memory_images_resized_once(parts, tokenizer):
    ds = _make(parts, "images")
    batch = _epoch(train_dataset(ds, tokenizer, 4, image_size=(4, 6), image_augment=False))[0]
    assert batch["image"].shape == (4, 4, 6, 3)
    # an 8x8 -> 4x6 antialiased bilinear resize: row pairs averaged; compare with Pillow's box-like filter loosely
    for image, item in zip(batch["image"], batch["image_id"]):
        ref = np.asarray(Image.fromarray(parts["images"][item]).resize((6, 4), Image.BILINEAR), np.float32) / 255.0
        assert np.abs(image - ref).mean() < 0.06


# ---------------------------------------------------------------------------------------------- image files
def test_image_files_decoded_in_tf_data_cached_or_streamed(parts, tokenizer, image_files):
    ds = _make(parts, "image_files", image_files)
    kwargs = dict(batch_size=4, image_size=SIZE, seed=5)
    cached = train_dataset(ds, tokenizer, cache=True, **kwargs)
    streamed = train_dataset(ds, tokenizer, cache=False, **kwargs)
    over_budget = train_dataset(ds, tokenizer, cache=True, cache_max_bytes=10, **kwargs)
    a, b, c = (_epoch(x) + _epoch(x) for x in (cached, streamed, over_budget))
    assert _all_equal(a, b) and _all_equal(a, c)
    # composite over white of the RGBA files (independent NumPy derivation in the fixture)
    plain = train_dataset(ds, tokenizer, batch_size=4, image_size=SIZE, image_augment=False)
    for batch in _epoch(plain):
        np.testing.assert_allclose(batch["image"], image_files[1][batch["image_id"]] / 255.0, atol=1e-6)


def test_jpeg_and_resized_files(parts, tokenizer, tmp_path):
    paths = []
    for i, pixels in enumerate(parts["images"]):
        big = Image.fromarray(pixels).resize((24, 16), Image.NEAREST)
        path = tmp_path / f"{i}.jpg"
        big.save(path, quality=95)
        paths.append(str(path))
    ds = Dataset("jpeg", image_paths=paths, **{k: parts[k] for k in ("captions", "caption_item", "item_split",
                                                                     "item_group")})
    ev = eval_dataset(ds, tokenizer, batch_size=5, image_size=(8, 12))
    images = np.concatenate([b["image"] for b in ev.items])
    assert images.shape == (N_ITEMS, 8, 12, 3)
    for image, path in zip(images, paths):
        ref = np.asarray(Image.open(path).convert("RGB").resize((12, 8), Image.BILINEAR), np.float32) / 255.0
        assert np.abs(image - ref).mean() < 0.03


# ---------------------------------------------------------------------------------------------- regions
class _SpyRegions:
    """An array-like over a NumPy array that records every row read and refuses to be converted whole."""

    def __init__(self, data):
        self._data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.reads = []

    def __len__(self):
        return len(self._data)

    def __getitem__(self, index):
        rows = np.atleast_1d(np.arange(len(self._data))[index])
        self.reads.append(rows)
        return self._data[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole region array was read")


def test_regions_read_lazily_per_batch(parts, tokenizer):
    spy = _SpyRegions(parts["regions"])
    ds = Dataset("spy", regions=spy, **{k: parts[k] for k in ("captions", "caption_item", "item_split",
                                                              "item_group")})
    train = train_dataset(ds, tokenizer, batch_size=3)
    assert spy.reads == []  # building the pipeline reads nothing
    batch = next(iter(train))
    assert spy.reads and all(len(rows) <= 3 for rows in spy.reads)
    np.testing.assert_array_equal(batch["regions"].numpy(), parts["regions"][batch["image_id"].numpy()])
    spy.reads.clear()
    ev = eval_dataset(ds, tokenizer, batch_size=5)
    assert spy.reads == []
    got = np.concatenate([b["regions"] for b in ev.items])
    np.testing.assert_array_equal(got, parts["regions"])
    assert all(len(rows) <= 5 for rows in spy.reads)


def test_region_rows_shared_memmap(parts, tokenizer, region_file):
    memmap = np.load(region_file, mmap_mode="r")
    full = _make(parts, "regions", region_file=region_file)
    test_split = full.split("test")  # shares the memmap through region_rows
    assert test_split.regions is full.regions
    ev = eval_dataset(test_split, tokenizer, batch_size=4)
    got = np.concatenate([b["regions"] for b in ev.items])
    np.testing.assert_array_equal(got, np.asarray(memmap)[np.flatnonzero(parts["item_split"] == "test")])


# ---------------------------------------------------------------------------------------------- evaluation
def test_eval_dataset_every_item_and_caption_once_in_order(kind_dataset, parts, tokenizer, image_files):
    kind, ds = kind_dataset
    ev = eval_dataset(ds, tokenizer, batch_size=5, max_length=7, image_size=SIZE)
    assert isinstance(ev, EvalData)
    assert ev.num_items == N_ITEMS and ev.num_captions == len(parts["captions"])
    np.testing.assert_array_equal(ev.caption_item, parts["caption_item"])
    np.testing.assert_array_equal(ev.item_group, parts["item_group"])
    for _ in range(2):  # a second pass (the image-file cache) gives the same
        items = _epoch(ev.items)
        assert [len(b["image_id"]) for b in items] == [5, 5, 2]
        np.testing.assert_array_equal(np.concatenate([b["image_id"] for b in items]), np.arange(N_ITEMS))
        np.testing.assert_array_equal(np.concatenate([b["group_id"] for b in items]), parts["item_group"])
        if kind == "regions":
            np.testing.assert_array_equal(np.concatenate([b["regions"] for b in items]), parts["regions"])
            assert all(b["region_mask"].all() and b["region_mask"].shape == b["regions"].shape[:2] for b in items)
        else:
            want = (parts["images"] if kind == "images" else image_files[1]) / 255.0
            np.testing.assert_allclose(np.concatenate([b["image"] for b in items]), want, atol=1e-6)
    caps = _epoch(ev.captions)
    np.testing.assert_array_equal(np.concatenate([b["caption_id"] for b in caps]), np.arange(ev.num_captions))
    np.testing.assert_array_equal(np.concatenate([b["image_id"] for b in caps]), parts["caption_item"])
    ids = np.concatenate([b["caption_ids"] for b in caps])
    np.testing.assert_array_equal(ids, _reference_ids(tokenizer, parts["captions"], 7))
    np.testing.assert_array_equal(np.concatenate([b["caption_mask"] for b in caps]), ids > 0)


def test_split_argument(parts, tokenizer):
    ds = _make(parts, "images")
    ev = eval_dataset(ds, tokenizer, batch_size=4, split="val")
    assert ev.num_items == 2
    np.testing.assert_array_equal(ev.item_group, parts["item_group"][8:10])
    train = train_dataset(ds, tokenizer, batch_size=2, split="train", shuffle=False)
    want = np.flatnonzero(parts["caption_item"] < 8)
    got = np.concatenate([b["caption_id"] for b in _epoch(train)])
    assert len(got) == len(want) - len(want) % 2
    groups = np.concatenate([b["group_id"] for b in _epoch(train)])
    assert set(groups) <= set(parts["item_group"][:8])


# ---------------------------------------------------------------------------------------------- errors
def test_errors(parts, tokenizer, image_files):
    ds = _make(parts, "images")
    m = ds.num_captions
    with pytest.raises(ValueError, match=rf"batch_size must be at most the number of captions \({m}\).*got {m + 1}"):
        train_dataset(ds, tokenizer, batch_size=m + 1)
    with pytest.raises(TypeError, match="tokenizer must be a tfemde.text.Tokenizer; got str"):
        train_dataset(ds, "tok.model", batch_size=2)
    with pytest.raises(TypeError, match="tokenizer must be a tfemde.text.Tokenizer"):
        eval_dataset(ds, None, batch_size=2)
    with pytest.raises(TypeError, match="dataset must be a tfemde.data.Dataset; got dict"):
        train_dataset({"images": 1}, tokenizer, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
        train_dataset(ds, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        eval_dataset(ds, tokenizer, batch_size=2, max_length=0)
    with pytest.raises(ValueError, match=r"region_drop must be a probability in \[0, 1\]; got 1.5"):
        train_dataset(ds, tokenizer, batch_size=2, region_drop=1.5)
    with pytest.raises(ValueError, match="caption_augment must be a probability"):
        train_dataset(ds, tokenizer, batch_size=2, caption_augment=-0.1)
    with pytest.raises(ValueError, match="crop_scale must be in"):
        train_dataset(ds, tokenizer, batch_size=2, crop_scale=0.0)
    for width in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"bucket_width must be an int >= 0; got {width!r}"):
            train_dataset(ds, tokenizer, batch_size=2, bucket_width=width)
    with pytest.raises(ValueError, match="split must be None or one of"):
        train_dataset(ds, tokenizer, batch_size=2, split="restval")
    with pytest.raises(ValueError, match="image_size must be None, a positive int or"):
        train_dataset(ds, tokenizer, batch_size=2, image_size=(8, 0))
    files = _make(parts, "image_files", image_files)
    with pytest.raises(ValueError, match="image_size is required for a dataset of image files"):
        eval_dataset(files, tokenizer, batch_size=2)
    floats = Dataset("f", images=parts["images"].astype(np.float32) / 255, **{
        k: parts[k] for k in ("captions", "caption_item", "item_split", "item_group")})
    with pytest.raises(ValueError, match=r"dataset.images must be uint8 with shape \[N, H, W, 3\]; got dtype float32"):
        train_dataset(floats, tokenizer, batch_size=2)
    empty = Dataset("empty", captions=[], caption_item=[], item_split=["train"], item_group=[0],
                    images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="has no captions"):
        train_dataset(empty, tokenizer, batch_size=1)


# ---------------------------------------------------------------------------------------------- shipped data
def test_builtin_emoji_through_both_pipelines():
    from tfemde.data import load

    emoji = load("emoji")
    train, val = emoji.split("train"), emoji.split("val")
    tokenizer = Tokenizer.train(train.captions, vocab_size=1000)
    batch = next(iter(train_dataset(train, tokenizer, batch_size=64, max_length=16)))
    assert batch["image"].shape == (64, 64, 64, 3) and batch["caption_ids"].shape == (64, 16)
    image = batch["image"].numpy()
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.mean() > 0.5  # drawn on white
    np.testing.assert_array_equal(batch["caption_mask"].numpy(), batch["caption_ids"].numpy() > 0)
    assert batch["caption_mask"].numpy().any(axis=1).all()
    ids = batch["image_id"].numpy()
    np.testing.assert_array_equal(batch["group_id"].numpy(), train.item_group[ids])
    ev = eval_dataset(val, tokenizer, batch_size=256, max_length=16)
    caps = _epoch(ev.captions)
    np.testing.assert_array_equal(np.concatenate([b["caption_ids"] for b in caps]),
                                  _reference_ids(tokenizer, val.captions, 16))
    assert sum(len(b["image_id"]) for b in ev.items) == val.num_items


def test_groups_times_instances_batches(parts, tokenizer):
    """instances_per_group=M: every batch is B/M different groups, M items of each (all different while the group
    has M), each with one of its own captions; as many batches an epoch as without it; new draws every epoch."""
    ds = _make(parts, "images")
    train = train_dataset(ds, tokenizer, batch_size=4, seed=3, instances_per_group=2, bucket_width=2)
    epochs = [_epoch(train) for _ in range(2)]
    assert {len(e) for e in epochs} == {ds.num_captions // 4} == {int(train.cardinality())}
    for batch in epochs[0] + epochs[1]:
        np.testing.assert_array_equal(batch["image_id"], parts["caption_item"][batch["caption_id"]])
        groups = batch["group_id"].reshape(2, 2)
        assert (groups[:, 0] == groups[:, 1]).all() and groups[0, 0] != groups[1, 0]
        items = batch["image_id"].reshape(2, 2)
        assert (items[:, 0] != items[:, 1]).all()  # the fixture's groups have two items each
    assert not all(np.array_equal(a["caption_id"], b["caption_id"]) for a, b in zip(*epochs))
    # M larger than a group: its items repeat, every one of them is used
    wide = _epoch(train_dataset(ds, tokenizer, batch_size=6, seed=3, instances_per_group=3))
    for batch in wide:
        for members in batch["image_id"].reshape(2, 3):
            assert len(set(members)) == 2
    with pytest.raises(ValueError, match="batch_size must be a multiple of instances_per_group \\(2\\); got 5"):
        train_dataset(ds, tokenizer, batch_size=5, instances_per_group=2)
    with pytest.raises(ValueError, match="needs 7 groups a batch; dataset 'mem' has 6"):
        train_dataset(ds, tokenizer, batch_size=14, instances_per_group=2)
    with pytest.raises(ValueError, match="cannot be combined with balance_groups"):
        train_dataset(ds, tokenizer, batch_size=4, instances_per_group=2, balance_groups=True)
