"""Tests of tfemde.text.Tokenizer: deterministic training, save/load, encoding rules and parity of implementations."""

import os
import pickle
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm

from tfemde.text import MASK_ID, PAD_ID, UNK_ID, Tokenizer

WORDS = ("a man woman dog cat riding horse beach red blue small large playing with ball on the in near street "
         "café naïve crème brûlée über straße niño façade smiling face heart eyes thumbs up grinning "
         "猫 狗 海滩 東京 日本 مرحبا שלום привет мир").split()

# Strings that have broken tokenizer parity elsewhere: Unicode normalisation, case, whitespace, scripts, lengths.
HARD_STRINGS = [
    "",
    " ",
    "\t",
    "\n",
    "   leading and trailing   ",
    "A man riding a horse on the beach.",
    "MiXeD CaSe WoRdS and ALL CAPS",
    "Café naïve crème brûlée",
    "CAFÉ NAÏVE",
    "cafe\u0301 nai\u0308ve",  # combining marks (NFD)
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "ﬁne ﬂower ﬀ",  # ligatures (NFKC)
    "İstanbul ǅ ß Σίσυφος",
    "tabs\tbetween\twords\tand\nnewlines",
    "猫が海辺に座っている",
    "一只猫和一只狗在海滩上",
    "東京タワー 서울 타워",
    "😀 grinning face 👍🏽 thumbs up",
    "👩‍👩‍👧 family ZWJ 🏳️‍🌈 flag",
    "a\u200db zero\u200cwidth\u200bspace",
    "مرحبا بالعالم",
    "שלום עולם mixed עם English",
    "\u202eright-to-left override\u202c",
    "привет мир",
    "<mask> <pad> <unk> </s> <s>",
    "numbers 0123456789 and punctuation !?.,;:'\"()[]{}",
    "x" * 1000,
    " ".join(["the small dog plays with a red ball"] * 30)[:1000],
    "".join(chr(0x4E00 + i) for i in range(1000)),
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "control\u0007chars\u001b",
]


def _corpus(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return Tokenizer.train(corpus, vocab_size=80)


def _reference_encode(model_proto, texts, max_length):
    """Independent re-derivation: the sentencepiece library, truncated and zero-padded in plain Python."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    ids = np.zeros((len(texts), max_length), dtype=np.int32)
    mask = np.zeros((len(texts), max_length), dtype=bool)
    for row, text in enumerate(texts):
        pieces = sp.encode(text, out_type=int)[:max_length]
        for col, piece in enumerate(pieces):
            ids[row, col] = piece
            mask[row, col] = True
    return ids, mask


def _encode_numpy(tokenizer, texts, max_length):
    return tokenizer.encode(texts, max_length)


def _encode_tensorflow_text(tokenizer, texts, max_length):
    import tensorflow as tf

    ids, mask = tokenizer.tf_encode(tf.constant(texts), max_length)
    return ids.numpy(), mask.numpy()


def _encode_onnxruntime_extensions(tokenizer, texts, max_length):
    """The front of the exported `text_e2e.onnx` (onnxruntime-extensions SentencepieceTokenizer op + padding).

    Registering the extensions' custom-op library in a process that has already imported TensorFlow segfaults
    (onnxruntime 1.32, ortx 0.15.2, TF 2.21), so the graph runs in a subprocess without TensorFlow. It pads to the
    longest caption; the columns up to max_length are padding.
    """
    import json
    import tempfile

    import onnx

    from tfemde.export import tokenizer_model

    code = ("import sys, json, numpy as np\n"
            "sys.modules['tensorflow'] = None\n"
            "from tfemde.serving.providers import make_session\n"
            "session = make_session(sys.argv[1], providers=['CPUExecutionProvider'], custom_ops=True)\n"
            "texts = json.loads(open(sys.argv[2], encoding='utf-8').read())\n"
            "ids, mask = session.run(['ids', 'mask'], {'text': np.array(texts, dtype=object)})\n"
            "np.savez(sys.argv[3], ids=ids, mask=mask)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        graph, strings, out = (os.path.join(tmp, name) for name in ("tok.onnx", "texts.json", "out.npz"))
        onnx.save_model(tokenizer_model(tokenizer.model_proto, max_length), graph)
        with open(strings, "w", encoding="utf-8") as f:
            json.dump(texts, f)
        done = subprocess.run([sys.executable, "-c", code, graph, strings, out], capture_output=True, text=True,
                              cwd=root, timeout=60)
        assert done.returncode == 0, done.stderr
        with np.load(out) as z:
            ids, mask = z["ids"], z["mask"]
    width = ids.shape[1]
    assert width == max(1, min(max_length, max(len(p) for p in tokenizer.tokenize(texts))))
    return (np.pad(ids, [(0, 0), (0, max_length - width)]), np.pad(mask, [(0, 0), (0, max_length - width)]))


# Every implementation that must give the training ids, the onnxruntime-extensions op of text_e2e.onnx included.
ENCODERS = {
    "sentencepiece": _encode_numpy,
    "tensorflow_text": _encode_tensorflow_text,
    "onnxruntime_extensions": _encode_onnxruntime_extensions,
}


# ---------------------------------------------------------------------------------------------- training
def test_train_is_deterministic(corpus, tokenizer):
    again = Tokenizer.train(list(corpus), vocab_size=80)
    from_generator = Tokenizer.train((c for c in corpus), vocab_size=80)
    assert again.model_proto == tokenizer.model_proto
    assert from_generator.model_proto == tokenizer.model_proto
    other = Tokenizer.train(_corpus(seed=1), vocab_size=80)
    assert other.model_proto != tokenizer.model_proto


def test_special_ids_and_vocab(tokenizer):
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    assert tokenizer.vocab_size == 80 == sp.get_piece_size()
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.mask_id) == (PAD_ID, UNK_ID, MASK_ID) == (0, 1, 2)
    assert sp.id_to_piece(0) == "<pad>" and sp.id_to_piece(1) == "<unk>" and sp.id_to_piece(2) == "<mask>"
    assert sp.is_control(2) and sp.bos_id() == -1 and sp.eos_id() == -1
    normal = tokenizer.normal_ids
    assert normal.min() == 3 and len(normal) == 77 and np.array_equal(normal, np.arange(3, 80))
    # The literal text "<mask>" is ordinary text: it never encodes to the mask id.
    assert MASK_ID not in tokenizer.tokenize(["<mask>"])[0]


def test_bpe_and_other_options(corpus):
    bpe = Tokenizer.train(corpus, vocab_size=100, model_type="bpe")
    assert bpe.vocab_size == 100 and "bpe" in repr(bpe)
    cased = Tokenizer.train(corpus, vocab_size=100, normalization="nmt_nfkc")
    assert cased.tokenize(["Dog"]) != cased.tokenize(["dog"])


def test_tiny_corpus_shrinks_vocab_with_warning():
    captions = ["a cat", "a dog"] * 5
    with pytest.warns(UserWarning, match=r"vocab_size=500 is too large .* using vocab_size=(\d+)"):
        small = Tokenizer.train(captions, vocab_size=500)
    assert 4 <= small.vocab_size < 500
    ids, mask = small.encode(["a cat", "a dog"], 4)
    assert mask.any(axis=1).all()
    with pytest.raises(ValueError, match="vocab_size=500 is too large .* the largest possible is"):
        Tokenizer.train(captions, vocab_size=500, shrink_vocab=False)


def test_train_errors():
    with pytest.raises(ValueError, match="captions is empty"):
        Tokenizer.train([], vocab_size=50)
    with pytest.raises(ValueError, match="captions must be strings; item 1 is int"):
        Tokenizer.train(["a cat", 3], vocab_size=50)
    with pytest.raises(ValueError, match="not one string"):
        Tokenizer.train("a cat", vocab_size=50)
    with pytest.raises(ValueError, match="model_type must be one of"):
        Tokenizer.train(["a cat"], model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 4"):
        Tokenizer.train(["a cat"], vocab_size=2)
    with pytest.raises(ValueError, match="'pad_id' is fixed"):
        Tokenizer.train(["a cat"], vocab_size=50, pad_id=3)


def test_model_without_pad_zero_is_rejected(corpus):
    import io

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=writer, vocab_size=60,
                                   minloglevel=2)  # sentencepiece defaults: unk 0, bos 1, eos 2, no pad
    with pytest.raises(ValueError, match="must have pad_id 0.*got pad_id -1"):
        Tokenizer(writer.getvalue())
    with pytest.raises(TypeError, match="model_proto must be bytes"):
        Tokenizer("model.model")


# ---------------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.model")
    loaded = Tokenizer.load(path)
    assert loaded.model_proto == tokenizer.model_proto
    with open(path, "rb") as f:
        assert f.read() == tokenizer.model_proto
    for other in (loaded, pickle.loads(pickle.dumps(tokenizer))):
        ids_a, mask_a = tokenizer.encode(HARD_STRINGS, 24)
        ids_b, mask_b = other.encode(HARD_STRINGS, 24)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(mask_a, mask_b)


# ---------------------------------------------------------------------------------------------- encoding rules
@pytest.mark.parametrize("max_length", [1, 7, 64, 1100])
def test_encode_matches_reference_truncation_and_padding(tokenizer, max_length):
    ids, mask = tokenizer.encode(HARD_STRINGS, max_length)
    want_ids, want_mask = _reference_encode(tokenizer.model_proto, HARD_STRINGS, max_length)
    assert ids.shape == (len(HARD_STRINGS), max_length) and ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)


def test_id_zero_only_at_padding(tokenizer):
    ids, mask = tokenizer.encode(HARD_STRINGS, 1100)
    np.testing.assert_array_equal(ids > 0, mask)
    # padding is a suffix: once a row is padded, it stays padded
    assert not (mask[:, 1:] & ~mask[:, :-1]).any()
    # the long strings really are truncated at small lengths, the empty-ish ones fully padded
    lengths = mask.sum(1)
    assert lengths[HARD_STRINGS.index(" ".join(["the small dog plays with a red ball"] * 30)[:1000])] >= 200
    for blank in ("", " ", "\t", "\n"):
        assert lengths[HARD_STRINGS.index(blank)] == 0
    assert (ids[mask] < tokenizer.vocab_size).all() and not (ids == MASK_ID).any()


def test_normalisation_rule(tokenizer):
    def same(a, b):
        return tokenizer.tokenize([a]) == tokenizer.tokenize([b])

    assert same("Café Naïve", "café naïve")
    assert same("CAFÉ", unicodedata.normalize("NFD", "café"))
    assert same("ＣＡＦＥ", "cafe")
    assert same("ﬁne", "fine")
    assert same("a\tdog\n on  the   beach ", "a dog on the beach")
    assert not same("cafe", "café")
    unknown = tokenizer.tokenize(["ꙮ"])[0]
    assert UNK_ID in unknown


def test_encode_errors(tokenizer):
    with pytest.raises(ValueError, match="not one string"):
        tokenizer.encode("a dog", 8)
    with pytest.raises(ValueError, match="item 1 is int"):
        tokenizer.encode(["a dog", 5], 8)
    with pytest.raises(ValueError, match=r"^texts item 1 holds a lone surrogate '\\ud800' at position 2; texts must"):
        tokenizer.encode(["a dog", "a \ud800 cat"], 8)
    with pytest.raises(ValueError, match=r"^texts item 0 is not valid UTF-8"):
        tokenizer.encode([b"caf\xe9"], 8)
    assert tokenizer.tokenize(["a\x00dog", b"a\x00dog"]) == tokenizer.tokenize(["a dog"]) * 2
    with pytest.raises(ValueError, match=r"^captions item 0 holds a lone surrogate"):
        Tokenizer.train(["\udfff"], vocab_size=8)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be a positive int"):
            tokenizer.encode(["a dog"], bad)
    import tensorflow as tf

    with pytest.raises(ValueError, match=r"texts must be a \[N\] tf.string tensor; got dtype string, shape \(1, 2\)"):
        tokenizer.tf_encode(tf.constant([["a", "b"]]), 8)
    with pytest.raises(ValueError, match="dtype int32"):
        tokenizer.tf_encode(tf.constant([1, 2]), 8)


def test_bytes_input_and_decode(tokenizer):
    ids, mask = tokenizer.encode([b"a red dog", "a red dog"], 8)
    np.testing.assert_array_equal(ids[0], ids[1])
    assert tokenizer.decode(ids) == ["a red dog", "a red dog"]
    with pytest.raises(ValueError, match=r"ids must have shape \[N, T\]"):
        tokenizer.decode(ids[0])


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("encoder", sorted(ENCODERS))
@pytest.mark.parametrize("max_length", [5, 48])
def test_parity_over_hard_strings(tokenizer, encoder, max_length):
    want_ids, want_mask = _reference_encode(tokenizer.model_proto, HARD_STRINGS, max_length)
    ids, mask = ENCODERS[encoder](tokenizer, HARD_STRINGS, max_length)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(HARD_STRINGS), max_length)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)


def test_tf_encode_inside_tf_data_and_tf_function(tokenizer):
    import tensorflow as tf

    want_ids, want_mask = _reference_encode(tokenizer.model_proto, HARD_STRINGS, 12)
    ds = tf.data.Dataset.from_tensor_slices(HARD_STRINGS).batch(8).map(lambda t: tokenizer.tf_encode(t, 12))
    got = list(ds.as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), want_ids)
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), want_mask)

    fresh = Tokenizer(tokenizer.model_proto)  # first use inside a trace
    fn = tf.function(lambda t: fresh.tf_encode(t, 12), input_signature=[tf.TensorSpec([None], tf.string)])
    ids, mask = fn(tf.constant(HARD_STRINGS))
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    ids, mask = fresh.tf_encode(tf.constant(HARD_STRINGS), 12)  # and reused eagerly afterwards
    np.testing.assert_array_equal(mask.numpy(), want_mask)


def test_encode_works_without_tensorflow(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok.model")
    want, _ = tokenizer.encode(["a red dog on the beach", "猫"], 6)
    code = (
        "import sys\n"
        "sys.modules['tensorflow'] = None\n"  # any import of tensorflow now raises ImportError
        "sys.modules['keras'] = None\n"
        "from tfemde.text import Tokenizer\n"
        f"ids, mask = Tokenizer.load({str(path)!r}).encode(['a red dog on the beach', '猫'], 6)\n"
        "print(ids.tolist())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(want.tolist())
