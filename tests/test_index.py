"""SetIndex: search against a brute-force ranking, save/load round trip and the file checks."""

import importlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tfemde.serving import Embeddings, SetIndex

index_module = importlib.import_module("tfemde.serving.index")


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def brute_scores(q, items, alpha, sketch_weight=0.0, depth=None):
    """Smooth-Chamfer (+ λ·mean row cosine of sketches) for every (query, item) pair, one pair at a time."""
    out = np.zeros((len(q), len(items)))
    for i in range(len(q)):
        for j in range(len(items)):
            x, y = q.sets[i].astype(np.float64), items.sets[j].astype(np.float64)
            if q.set_mask is not None:
                x = x[q.set_mask[i]]
            if items.set_mask is not None:
                y = y[items.set_mask[j]]
            c = alpha * x @ y.T
            lse_x = np.log(np.exp(c - c.max(1, keepdims=True)).sum(1)) + c.max(1)
            lse_y = np.log(np.exp(c - c.max(0, keepdims=True)).sum(0)) + c.max(0)
            out[i, j] = lse_x.mean() / (2 * alpha) + lse_y.mean() / (2 * alpha)
            if sketch_weight:
                a = q.sketches[i].reshape(depth, -1)
                b = items.sketches[j].reshape(depth, -1)
                out[i, j] += sketch_weight * np.mean([a[n] @ b[n] for n in range(depth)])
    return out


def brute_top_k(scores, ids, k):
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.asarray(ids)[order], np.take_along_axis(scores, order, axis=1)


def make_items(rng, n, k=3, d=8, depth=2, width=4, masked=False):
    sk = rng.random((n, depth, width))
    sk /= np.linalg.norm(sk, axis=-1, keepdims=True)
    mask = None
    if masked:
        mask = rng.random((n, k)) > 0.3
        mask[:, 0] = True
    return Embeddings(unit(rng, n, k, d), sketches=sk.astype(np.float32), set_mask=mask)


@pytest.mark.parametrize("blocks", [None, (2, 3)])
@pytest.mark.parametrize("k", [1, 4, 50])
def test_search_matches_brute_force(rng, monkeypatch, blocks, k):
    if blocks is not None:  # exercise the query blocks and the running top-k merge over item blocks
        monkeypatch.setattr(index_module, "_QUERY_BLOCK", blocks[0])
        monkeypatch.setattr(index_module, "_ITEM_BLOCK", blocks[1])
    items = [make_items(rng, 6, masked=True), make_items(rng, 5)]
    queries = make_items(rng, 4, k=2)
    index = SetIndex(alpha=16.0, sketch_weight=0.5, chunk_size=(3, 2))
    index.add(items[0], ids=[f"a{i}" for i in range(6)])
    index.add(items[1], ids=np.array([f"b{i}" for i in range(5)], dtype=object))
    assert len(index) == 11
    ids, scores = index.search(queries, k=k)
    want_ids, want_scores = brute_top_k(brute_scores(queries, Embeddings.concat(items), 16.0, 0.5, depth=2),
                                        index.ids, k)
    assert ids.shape == scores.shape == (4, min(k, 11))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=2e-6)


def test_default_ids_and_int_ids(rng):
    index = SetIndex(alpha=16.0)
    a, b = make_items(rng, 3), make_items(rng, 2)
    index.add(a)
    index.add(b)
    np.testing.assert_array_equal(index.ids, [0, 1, 2, 3, 4])
    ids, scores = index.search(a, k=1)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])  # every set is its own best match
    other = SetIndex()
    other.add(a, ids=np.array([30, 10, 20], dtype=np.int32))
    assert other.search(a[1], k=1)[0].tolist() == [[10]]


def test_save_load_round_trip(rng, tmp_path):
    index = SetIndex(alpha=12.0, sketch_weight=0.25, chunk_size=(2, 3))
    index.add(make_items(rng, 7, masked=True), ids=[f"item{i}" for i in range(7)])
    queries = make_items(rng, 3)
    path = index.save(tmp_path / "index.npz")
    assert path == str(tmp_path / "index.npz") and os.listdir(tmp_path) == ["index.npz"]
    loaded = SetIndex.load(path)
    assert (loaded.alpha, loaded.sketch_weight, loaded.chunk_size, len(loaded)) == (12.0, 0.25, (2, 3), 7)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.embeddings.set_mask, index.embeddings.set_mask)
    for got, want in zip(loaded.search(queries, k=4), index.search(queries, k=4)):
        np.testing.assert_array_equal(got, want)
    # the file holds no pickles
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["ids", "meta", "set_mask", "sets", "sketches"]
    # an empty index round-trips too
    SetIndex().save(tmp_path / "empty.npz")
    assert len(SetIndex.load(tmp_path / "empty.npz")) == 0


def _saved(rng, tmp_path, name="index.npz"):
    index = SetIndex(alpha=16.0)
    index.add(make_items(rng, 6, d=32))
    return index, index.save(tmp_path / name)


def test_corrupt_byte_in_data_is_detected(rng, tmp_path):
    _, path = _saved(rng, tmp_path)
    raw = bytearray(Path(path).read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the sets array
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"index\.npz"):
        SetIndex.load(path)


def test_any_flipped_byte_errors_or_changes_nothing(rng, tmp_path):
    index, path = _saved(rng, tmp_path)
    raw = Path(path).read_bytes()
    flipped = tmp_path / "flipped.npz"
    detected = 0
    for pos in np.linspace(0, len(raw) - 1, 60).astype(int):
        data = bytearray(raw)
        data[pos] ^= 0x10
        flipped.write_bytes(bytes(data))
        try:
            loaded = SetIndex.load(flipped)
        except ValueError as e:
            assert "flipped.npz" in str(e)
            detected += 1
            continue
        # a flip in bytes no reader uses (zip timestamps, padding) must leave the index as it was
        np.testing.assert_array_equal(loaded.embeddings.sets, index.embeddings.sets)
        np.testing.assert_array_equal(loaded.ids, index.ids)
        assert (loaded.alpha, loaded.sketch_weight) == (index.alpha, index.sketch_weight)
    assert detected >= 50


def test_truncated_file(rng, tmp_path):
    _, path = _saved(rng, tmp_path)
    raw = Path(path).read_bytes()
    for size in (0, 10, len(raw) // 2, len(raw) - 1):
        Path(path).write_bytes(raw[:size])
        with pytest.raises(ValueError, match=r"index\.npz.*(corrupt|truncated)"):
            SetIndex.load(path)


def test_tampered_array_with_valid_zip_is_detected(rng, tmp_path):
    _, path = _saved(rng, tmp_path)
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files}
    arrays["sets"] = arrays["sets"].copy()
    arrays["sets"][0, 0, 0] += 0.5
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(ValueError, match=r"tampered\.npz.*checksum does not match"):
        SetIndex.load(tmp_path / "tampered.npz")


def test_wrong_version_and_not_an_index(rng, tmp_path, monkeypatch):
    index = SetIndex()
    index.add(make_items(rng, 2))
    monkeypatch.setattr(index_module, "FORMAT_VERSION", 99)
    index.save(tmp_path / "future.npz")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"future\.npz.*format version 99.*reads version 1"):
        SetIndex.load(tmp_path / "future.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz.*not a SetIndex file"):
        SetIndex.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"missing\.npz.*does not exist"):
        SetIndex.load(tmp_path / "missing.npz")
    with np.load(tmp_path / "future.npz") as z:
        meta = json.loads(bytes(z["meta"]).decode())
    assert meta["format"] == "tfemde.SetIndex" and len(meta["sha256"]) == 64


def test_failed_save_leaves_no_partial_file(rng, tmp_path, monkeypatch):
    index, path = _saved(rng, tmp_path)
    before = Path(path).read_bytes()

    def broken_write(f, arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_write_npz", broken_write)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)  # over an existing file: it stays as it was
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "new.npz")
    assert sorted(os.listdir(tmp_path)) == ["index.npz"]
    assert Path(path).read_bytes() == before
    assert zipfile.is_zipfile(path)


def test_index_errors(rng):
    index = SetIndex(alpha=16.0)
    with pytest.raises(ValueError, match="empty"):
        index.search(make_items(rng, 1), k=1)
    index.add(make_items(rng, 3), ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"ids must be unique; repeated: \[3\]"):
        index.add(make_items(rng, 2), ids=[3, 4])
    with pytest.raises(ValueError, match=r"ids must have shape \[M\] = \(2,\)"):
        index.add(make_items(rng, 2), ids=[5])
    with pytest.raises(ValueError, match="same kind"):
        index.add(make_items(rng, 1), ids=["x"])
    with pytest.raises(ValueError, match=r"\[K, D\] = \(3, 8\)"):
        index.add(Embeddings(unit(rng, 1, 3, 4)))
    with pytest.raises(ValueError, match="element dimension D = 8"):
        index.search(Embeddings(unit(rng, 1, 3, 4)), k=1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(make_items(rng, 1), k=0)
    with pytest.raises(ValueError, match="need sketches"):
        SetIndex(sketch_weight=1.0).add(Embeddings(unit(rng, 1, 3, 8)))
    with pytest.raises(ValueError, match="alpha must be a positive"):
        SetIndex(alpha=-1.0)
    assert len(index) == 3  # failed adds changed nothing


def test_concurrent_add_search_and_save_agree_with_a_serial_index(rng, tmp_path):
    """4 threads: one adds 40 batches, two search, one saves, all at once. Every search result is the result a serial index of
    some prefix of the batches gives (nothing lost, no other item's id), every saved file loads, and the final index
    equals the serial one."""
    import threading
    import time

    batches = [make_items(rng, 5) for _ in range(40)]
    ids = [[f"b{b}i{i}" for i in range(5)] for b in range(40)]
    queries = make_items(rng, 3)
    serial = SetIndex(alpha=16.0, sketch_weight=0.5)
    prefix_results = {}
    for b in range(40):
        serial.add(batches[b], ids=ids[b])
        found, scores = serial.search(queries, k=7)
        prefix_results[len(serial)] = (found.tolist(), scores)

    index = SetIndex(alpha=16.0, sketch_weight=0.5)
    index.add(batches[0], ids=ids[0])
    errors, seen, saved = [], [], []

    def adder():
        for b in range(1, 40):
            index.add(batches[b], ids=ids[b])
            time.sleep(0.001)

    def searcher():
        for _ in range(60):
            found, scores = index.search(queries, k=7)
            seen.append((found.tolist(), scores))

    def saver():
        for n in range(15):
            path = tmp_path / f"i{n % 3}.npz"
            index.save(path)
            saved.append(len(SetIndex.load(path)))

    def guard(target):
        def run():
            try:
                target()
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))
        return run

    threads = [threading.Thread(target=guard(t)) for t in (adder, searcher, searcher, saver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert seen and saved and all(n % 5 == 0 and 5 <= n <= 200 for n in saved)
    matches = {n: r for n, r in prefix_results.items()}
    for found, scores in seen:
        assert any(found == want_found and np.allclose(scores, want_scores)
                   for want_found, want_scores in matches.values()), found
    assert len(index) == len(serial) == 200
    np.testing.assert_array_equal(index.ids, serial.ids)
    final_found, final_scores = index.search(queries, k=7)
    assert final_found.tolist() == prefix_results[200][0]
