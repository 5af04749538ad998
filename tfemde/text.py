"""SentencePiece tokenizer: train on captions, encode in NumPy (serving) or in TensorFlow (training), save/load.

One `.model` file (a serialized SentencePiece `ModelProto`) is the whole tokenizer. The `sentencepiece` library,
`tensorflow_text.SentencepieceTokenizer` and the onnxruntime-extensions `SentencepieceTokenizer` op all read it and
give identical ids (DEPENDENCIES.md §3; `tests/test_text.py` checks it over a corpus of hard strings).

Conventions of a tokenizer made by `Tokenizer.train`:

* id 0 is `<pad>` and is never produced by encoding, so `ids > 0` are exactly the real tokens;
* id 1 is `<unk>` (characters not seen in training);
* id 2 is `<mask>`, a control symbol: text never encodes to it (the literal string `"<mask>"` is ordinary text), it is
  only written by caption augmentation (`tfemde.data.train_dataset`) in place of a masked token;
* characters unseen in training encode to `<unk>`; a run of them is one `<unk>` (SentencePiece's rule);
* no `<s>`/`</s>`: encoding adds no begin/end ids (there is nothing to keep in sync between implementations);
* normalisation: SentencePiece's `nmt_nfkc_cf` rule, i.e. NFKC, then Unicode case folding (`"Café"`, `"CAFÉ"`,
  `"ｃａｆé"` encode alike; `"ﬁ"` becomes `"fi"`), control characters and tabs/newlines become spaces, runs of
  whitespace collapse to one and leading/trailing whitespace is dropped. The rule is compiled into the `.model` file,
  so every implementation applies exactly the same normalisation.

This module imports TensorFlow only inside `Tokenizer.tf_encode`, so `encode` runs in TF-free serving processes.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
MASK_ID = 2
MASK_PIECE = "<mask>"
DEFAULT_NORMALIZATION = "nmt_nfkc_cf"
MODEL_TYPES = ("unigram", "bpe", "word", "char")

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def check_text(text, index: int, what: str = "texts") -> str:
    """One input text as every tokenization route takes it (training, `encode`, serving's text graphs).

    Bytes are decoded as UTF-8 and NUL becomes a space (SentencePiece maps control characters to spaces, but the
    ONNX tokenizer op reads a C string and would stop at NUL). Anything else that is not valid Unicode text gets one
    `ValueError` naming the item.

    Args:
        text: a `str` or UTF-8 `bytes`.
        index: its position in the input, for the message.
        what: the argument's name, for the message.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{what} item {index} is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    if not isinstance(text, str):
        raise ValueError(f"{what} must be strings; item {index} is {type(text).__name__}: {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} item {index} holds a lone surrogate {text[error.start]!r} at position "
                         f"{error.start}; {what} must be valid Unicode") from None
    return text.replace("\x00", " ")


def check_texts(texts, what: str = "texts") -> list:
    """A list of `check_text`-ed strings; one string (instead of a list of them) is a `ValueError`."""
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of strings, not one string; wrap it in a list: [text]")
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of strings; got {type(texts).__name__}") from None
    return [check_text(text, i, what) for i, text in enumerate(texts)]


def _check_captions(captions) -> list:
    captions = check_texts(captions, "captions")
    if not captions:
        raise ValueError("captions is empty; Tokenizer.train needs at least one caption")
    return captions


class Tokenizer:
    """A SentencePiece tokenizer with fixed-length, padded encoding in NumPy and in TensorFlow.

    Args:
        model_proto: the serialized SentencePiece model (the bytes of a `.model` file). Its pad id must be 0.

    Example:
    >>> tok = Tokenizer.train(["a red apple", "a green pear", "two red cherries"] * 10, vocab_size=22)
    >>> ids, mask = tok.encode(["a red pear", ""], max_length=6)
    >>> ids.shape, ids.dtype, mask.dtype
    ((2, 6), dtype('int32'), dtype('bool'))
    >>> bool(((ids > 0) == mask).all()), bool(mask[1].any())
    (True, False)
    """

    def __init__(self, model_proto: bytes):
        if not isinstance(model_proto, (bytes, bytearray)):
            raise TypeError(f"model_proto must be bytes (a .model file's content); got {type(model_proto).__name__}")
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"the SentencePiece model must have pad_id {PAD_ID} (so that id 0 means padding); got pad_id "
                f"{self._sp.pad_id()}. Train it with Tokenizer.train or with pad_id=0, unk_id=1.")
        mask_id = self._sp.piece_to_id(MASK_PIECE)
        self._mask_id = mask_id if self._sp.is_control(mask_id) and mask_id != PAD_ID else self._sp.unk_id()
        n = self._sp.get_piece_size()
        self._normal_ids = np.array(
            [i for i in range(n) if not (self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i))],
            dtype=np.int32)

    # ------------------------------------------------------------------ training and persistence
    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 8000, model_type: str = "unigram",
              character_coverage: float = 1.0, normalization: str = DEFAULT_NORMALIZATION,
              num_threads: int = 1, seed: int = 0, shrink_vocab: bool = True, **trainer_kwargs) -> "Tokenizer":
        """Trains a SentencePiece model on captions held in memory; the same input gives a byte-identical model.

        Args:
            captions: an iterable of caption strings (held in memory, never written to disk).
            vocab_size: number of pieces, the 3 special ones (`<pad>`, `<unk>`, `<mask>`) included.
            model_type: `"unigram"`, `"bpe"`, `"word"` or `"char"`.
            character_coverage: fraction of characters covered by the vocabulary; the rest encode to `<unk>`.
            normalization: a SentencePiece normalization rule name; the default `"nmt_nfkc_cf"` is NFKC plus case
                folding (see the module docstring). `"nmt_nfkc"` keeps case.
            num_threads: training threads. 1 (default) makes the model a function of the input alone; other
                values give a different (still repeatable) model.
            seed: seed of SentencePiece's random generator (used only by sampling options).
            shrink_vocab: if the corpus is too small for `vocab_size`, train with the largest size it allows and
                warn (True), or raise `ValueError` (False).
            **trainer_kwargs: any other `sentencepiece` trainer option (e.g. `max_sentence_length`).

        Returns:
            A `Tokenizer`.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {model_type!r}")
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 4:
            raise ValueError(f"vocab_size must be an int >= 4 (3 special pieces + at least one piece); "
                             f"got {vocab_size!r}")
        captions = _check_captions(captions)
        options = dict(
            model_type=model_type, character_coverage=character_coverage,
            normalization_rule_name=normalization, num_threads=num_threads,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1, control_symbols=[MASK_PIECE],
            minloglevel=2,
        )
        for key in trainer_kwargs:
            if key in ("pad_id", "unk_id", "bos_id", "eos_id", "control_symbols", "sentence_iterator",
                       "model_writer", "input", "model_prefix"):
                raise ValueError(f"trainer option {key!r} is fixed by Tokenizer.train and cannot be overridden")
        options.update(trainer_kwargs)

        def run(size):
            spm.set_random_generator_seed(int(seed))
            writer = io.BytesIO()
            spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=writer,
                                           vocab_size=int(size), **options)
            return writer.getvalue()

        try:
            proto = run(vocab_size)
        except RuntimeError as err:
            match = _TOO_HIGH.search(str(err))
            if match is None:
                raise ValueError(f"SentencePiece could not train a vocabulary of {vocab_size} pieces on "
                                 f"{len(captions)} captions: {err}") from None
            allowed = int(match.group(2))
            if not shrink_vocab:
                message = (f"vocab_size={vocab_size} is too large for these {len(captions)} captions; the largest "
                           f"possible is {allowed}. Lower vocab_size or pass shrink_vocab=True.")
                raise ValueError(message) from None
            warnings.warn(f"vocab_size={vocab_size} is too large for these {len(captions)} captions; "
                          f"using vocab_size={allowed} instead", stacklevel=2)
            proto = run(allowed)
        return cls(proto)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Loads a tokenizer from a SentencePiece `.model` file."""
        with open(os.fspath(path), "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except (ValueError, RuntimeError, OSError) as error:
            raise ValueError(f"tokenizer file {os.fspath(path)} cannot be read: {error}") from None

    def save(self, path) -> str:
        """Writes the `.model` file (the model proto bytes) and returns its path."""
        path = os.fspath(path)
        with open(path, "wb") as f:
            f.write(self._proto)
        return path

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model, the content of the `.model` file."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included: ids lie in `[0, vocab_size)`."""
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def mask_id(self) -> int:
        """The `<mask>` control id written by caption augmentation (the unk id if the model has no `<mask>`)."""
        return int(self._mask_id)

    @property
    def normal_ids(self) -> np.ndarray:
        """`[V']` int32 ids of the ordinary pieces (not pad, unk, mask or other control ids)."""
        return self._normal_ids.copy()

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, model_type={self._model_type()!r})"

    def _model_type(self):
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(self._proto)
        return pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type).lower()

    def __getstate__(self):
        return {"model_proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _check_texts(texts) -> list:
        return check_texts(texts)

    @staticmethod
    def _check_max_length(max_length):
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive int; got {max_length!r}")
        return int(max_length)

    def tokenize(self, texts: Sequence[str]) -> list:
        """The ids of each text, unpadded and untruncated.

        Args:
            texts: `N` strings (bytes are decoded as UTF-8).

        Returns:
            A list of `N` lists of int ids (all > 0).
        """
        return self._sp.encode(self._check_texts(texts), out_type=int)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple:
        """Encodes texts to fixed-length ids with the `sentencepiece` library (NumPy, no TensorFlow).

        Args:
            texts: `N` strings.
            max_length: `T`; longer texts are truncated to their first `T` ids, shorter ones padded with 0.

        Returns:
            `(ids, mask)`: `ids` `[N, T]` int32, `mask` `[N, T]` bool, True at real tokens (`mask == (ids > 0)`).
        """
        max_length = self._check_max_length(max_length)
        pieces = self.tokenize(texts)
        ids = np.zeros((len(pieces), max_length), dtype=np.int32)
        lengths = np.fromiter((min(len(p), max_length) for p in pieces), dtype=np.int64, count=len(pieces))
        for row, (p, n) in enumerate(zip(pieces, lengths)):
            ids[row, :n] = p[:n]
        mask = np.arange(max_length)[None, :] < lengths[:, None]
        return ids, mask

    def decode(self, ids) -> list:
        """Texts (normalised) of `[N, T]` ids; padding (0) and control ids are skipped."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape [N, T]; got shape {ids.shape}")
        return [self._sp.decode([int(i) for i in row if i > 0]) for row in ids]

    def tf_encode(self, texts, max_length: int) -> tuple:
        """Encodes a string tensor to fixed-length ids with `tensorflow_text` (usable in `tf.data` and `tf.function`).

        Gives exactly the ids and mask of `encode`.

        Args:
            texts: `[N]` `tf.string` tensor (or anything `tf.convert_to_tensor` makes one of).
            max_length: `T`.

        Returns:
            `(ids, mask)`: `ids` `[N, T]` int32, `mask` `[N, T]` bool.
        """
        import tensorflow as tf

        max_length = self._check_max_length(max_length)
        texts = tf.convert_to_tensor(texts)
        if texts.dtype != tf.string or texts.shape.rank != 1:
            raise ValueError(f"texts must be a [N] tf.string tensor; got dtype {texts.dtype.name}, shape {texts.shape}")
        import tensorflow_text as tft

        # A new tft tokenizer per call (per trace inside tf.function / tf.data): its model resource is owned by the
        # op kernel, and tf.random.set_seed (keras.utils.set_random_seed) clears eager kernels, which would leave a
        # cached eager tokenizer pointing to a deleted resource.
        tokenizer = tft.SentencepieceTokenizer(model=self._proto, out_type=tf.int32)
        tokens = tokenizer.tokenize(texts)[:, :max_length]
        ids = tokens.to_tensor(default_value=PAD_ID, shape=[None, max_length])
        mask = tf.sequence_mask(tokens.row_lengths(), max_length)
        return ids, mask
