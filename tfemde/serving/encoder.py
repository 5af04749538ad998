"""`Encoder`: texts and images to set embeddings with an exported model in onnxruntime (no TensorFlow).

Two text routes give the same embeddings (tests check it):

* `"sentencepiece"` (the default): the `sentencepiece` library tokenizes with the export's `tokenizer.model`
  (`tfemde.text.Tokenizer`, the training tokenizer), then `text.onnx` runs on the ids. It needs no custom-op
  library, works in any process (also one that has imported TensorFlow, like `tfemde quickstart`), and sorts a
  large batch by length so that little padding is computed.
* `"e2e"`: `text_e2e.onnx` takes the strings and tokenizes inside the graph with the onnxruntime-extensions
  SentencePiece op: one graph, as an application in another language would use it. Registering that op library
  crashes a process that has imported TensorFlow, so this route refuses to load there.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from tfemde.serving import manifest as mf
from tfemde.serving.embeddings import Embeddings
from tfemde.serving.providers import (_tensorflow_loaded, choose_providers, cpu_has_vnni, cuda_problem,
                                      installed_onnxruntime_wheels, make_session)

TEXT_ROUTES = ("sentencepiece", "e2e")
PRECISIONS = ("float32", "int8")
DEFAULT_BATCH_SIZE = 64


def _is_path(x) -> bool:
    return isinstance(x, (str, bytes, os.PathLike))


def _model_files(spec: mf.Manifest, precision: str, vnni: bool) -> dict:
    """`{exported name: file to run}`: the int8 files of a quantized export for `precision="int8"`, their int8-weight
    copies where the CPU has VNNI (`vnni`; exact there and faster, see `tfemde.export.quantize`)."""
    if precision != "int8":
        return {}
    if not spec.int8_files:
        raise ValueError("this export has no int8 graphs; export with quantize=True (`tfemde export --quantize`) "
                         "or load with precision='float32'")
    return {**spec.int8_files, **(spec.int8_vnni_files if vnni else {})}


class Encoder:
    """Encodes texts and images with a model exported by `tfemde.export.export_run`, in onnxruntime.

    Create it with `Encoder.load(export_dir)`. Sessions are created on first use of each encoder; the files are
    checked against the manifest's sha256 at load.

    Attributes:
        manifest: the export's `manifest.json` as a dict; `spec` is its typed `tfemde.serving.manifest.Manifest`.
        set_size, dim: K and D of the set embeddings `[N, K, D]`.
        sketch_size, sketch_depth: S and the depth of the sketches `[N, S]` (0 and None without a sketch).
        alpha, sketch_weight: the similarity's α and λ; `similarity_kwargs` is `{"alpha", "sketch_weight"}`
            for `SetIndex(**...)` and `similarity(..., **...)`.
        max_length: captions are truncated to this many tokens.
        image_input: `"pixels"`, `"backbone"` (images `[N, H, W, 3]`) or `"regions"` (features `[N, R, F]`).
        image_size: `(H, W)` for image models, None for region models.
        providers: the onnxruntime execution providers the sessions use.

    Example:
        >>> # encoder = Encoder.load("exports/dive_temde")
        >>> # index = SetIndex(**encoder.similarity_kwargs); index.add(encoder.encode_images(paths), ids=paths)
        >>> # ids, scores = index.search(encoder.encode_texts(["a red heart"]), k=5)
    """

    def __init__(self, export_dir, manifest: dict, providers, text_route: str, batch_size: int, threads,
                 spinning: bool = False, precision: str = "float32", verified: Optional[dict] = None,
                 files: Optional[dict] = None):
        self.export_dir = Path(export_dir)
        # {file name: bytes} read and checked at load; sessions and the tokenizer are made from these bytes, so the
        # encoder runs what was verified even if the folder changes later.
        self._verified = dict(verified or {})
        self.precision = precision
        self.spec = spec = mf.Manifest.from_dict(manifest, repr(str(export_dir)))
        # {exported name: file run in its place}, chosen once by `load` (which verified those files).
        self._files = dict(files) if files is not None else _model_files(spec, precision, cpu_has_vnni())
        self.manifest = manifest
        self.export_digest = mf.export_digest(manifest)
        self.providers = providers
        self.text_route = text_route
        self.batch_size = batch_size
        self._threads = threads
        self._spinning = spinning
        self._sessions = {}
        self._tokenizer = None
        self.set_size, self.dim = spec.set_size, spec.dim
        self.sketch_size, self.sketch_depth = spec.sketch_size, spec.sketch_depth
        self.alpha, self.sketch_weight = spec.alpha, spec.sketch_weight
        self.max_length = spec.max_length
        self.image_input, self.image_size, self.region_dim = spec.image_input, spec.image_size, spec.region_dim

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, export_dir, providers=None, text_route: str = "sentencepiece", batch_size: int = DEFAULT_BATCH_SIZE,
             threads: Optional[int] = None, spinning: bool = False, verify: bool = True,
             precision: str = "float32") -> "Encoder":
        """Open an export folder.

        Args:
            export_dir: a folder written by `tfemde export` / `export_run`.
            providers: None for CUDA when onnxruntime has it, else the CPU; or provider names (see
                `tfemde.serving.providers.choose_providers`).
            text_route: `"sentencepiece"` (tokenize in Python, run `text.onnx`) or `"e2e"` (run
                `text_e2e.onnx` on the strings); see the module docstring.
            batch_size: items per onnxruntime call in `encode_*` (overridable per call).
            threads: onnxruntime intra-op threads (None: one per core).
            spinning: keep onnxruntime's threads spin-waiting between calls (faster on a dedicated machine,
                slower on a shared one); by default they spin only while a call runs (see
                `tfemde.serving.providers.make_session`).
            verify: check the sha256 of every file the encoder uses against the manifest (recommended).
            precision: `"float32"` (the exact export) or `"int8"` (`image.int8.onnx` / `text.int8.onnx` of an
                export made with `quantize=True`: faster on CPUs, within the cosine recorded in the manifest; on a
                CPU with VNNI their `*.int8.vnni.onnx` copies, which give the same outputs faster).

        Raises:
            ExportFileError: the folder is not an export, or a file it needs is missing, corrupt or changed (the
                message names the file).
            ValueError: a bad argument (an unknown text route, precision or provider; `precision="int8"` with
                `text_route="e2e"` or with an export that has no int8 graphs).
            RuntimeError: `text_route="e2e"` in a process that has imported TensorFlow.
        """
        import onnxruntime as ort

        if text_route not in TEXT_ROUTES:
            raise ValueError(f"text_route must be one of {TEXT_ROUTES}; got {text_route!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        if precision == "int8" and text_route == "e2e":
            raise ValueError("precision='int8' has no text_e2e graph; use text_route='sentencepiece' with int8")
        if text_route == "e2e" and _tensorflow_loaded():
            raise RuntimeError("text_route='e2e' needs the onnxruntime-extensions op library, which crashes a "
                               "process that has imported TensorFlow; use text_route='sentencepiece' here")
        batch_size = cls._check_batch_size(batch_size)
        manifest = mf.read_manifest(export_dir)
        files = _model_files(mf.Manifest.from_dict(manifest, repr(str(export_dir))), precision, cpu_has_vnni())
        available = ort.get_available_providers()
        chosen = choose_providers(available, providers)
        if providers is None:
            problem = cuda_problem(available, installed_onnxruntime_wheels())
            if problem:
                warnings.warn(problem, RuntimeWarning, stacklevel=2)
        verified = None
        if verify:
            text_file = mf.TEXT_E2E_ONNX if text_route == "e2e" else files.get(mf.TEXT_ONNX, mf.TEXT_ONNX)
            image_file = files.get(mf.IMAGE_ONNX, mf.IMAGE_ONNX)
            verified = mf.read_verified(export_dir, manifest, [image_file, text_file, mf.TOKENIZER_FILE])
        return cls(export_dir, manifest, chosen, text_route, batch_size, threads, spinning, precision, verified,
                   files)

    def __repr__(self) -> str:
        sketch = f", sketch {self.sketch_size} (depth {self.sketch_depth})" if self.sketch_size else ""
        return (f"Encoder({str(self.export_dir)!r}: {self.manifest.get('preset')}, sets [K={self.set_size}, "
                f"D={self.dim}]{sketch}, image input {self.image_input}, text route {self.text_route}, "
                f"precision {self.precision}, providers {self.providers})")

    @property
    def similarity_kwargs(self) -> dict:
        """`{"alpha": α, "sketch_weight": λ}`, the model's similarity, for `SetIndex(**...)` and `similarity`."""
        return {"alpha": self.alpha, "sketch_weight": self.sketch_weight}

    def similarity(self, a: Embeddings, b: Embeddings) -> np.ndarray:
        """`[N_a, N_b]` scores with the model's own similarity (`tfemde.serving.similarity` with its α, λ)."""
        from tfemde.serving.similarity import similarity

        return similarity(a, b, **self.similarity_kwargs)

    def _session(self, name: str):
        name = self._files.get(name, name)
        if name not in self._sessions:
            source = self._verified.get(name) or mf.contained_path(self.export_dir, name)
            self._sessions[name] = make_session(source, providers=self.providers,
                                                custom_ops=(name == mf.TEXT_E2E_ONNX), threads=self._threads,
                                                spinning=self._spinning)
        return self._sessions[name]

    @property
    def tokenizer(self):
        """The training tokenizer (`tfemde.text.Tokenizer`) from the export's `tokenizer.model`."""
        if self._tokenizer is None:
            from tfemde.text import Tokenizer

            verified = self._verified.get(mf.TOKENIZER_FILE)
            self._tokenizer = (Tokenizer(verified) if verified is not None
                               else Tokenizer.load(self.export_dir / mf.TOKENIZER_FILE))
        return self._tokenizer

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _check_batch_size(batch_size) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        return int(batch_size)

    def _empty(self) -> Embeddings:
        return self._embeddings(np.zeros((0, self.set_size, self.dim), np.float32),
                                np.zeros((0, self.sketch_size), np.float32) if self.sketch_size else None)

    def _embeddings(self, sets, sketches) -> Embeddings:
        return Embeddings(sets, sketches=sketches, sketch_depth=self.sketch_depth if sketches is not None else None)

    def _run(self, name: str, batches) -> Embeddings:
        """Run the graph `name` on each feed dict of `batches` and join the `set` / `sketch` outputs."""
        session = self._session(name)
        outputs = ["set", "sketch"] if self.sketch_size else ["set"]
        sets, sketches = [], []
        for feeds in batches:
            result = session.run(outputs, feeds)
            sets.append(result[0])
            if self.sketch_size:
                sketches.append(result[1])
        if not sets:
            return self._empty()
        return self._embeddings(np.concatenate(sets), np.concatenate(sketches) if self.sketch_size else None)

    # ------------------------------------------------------------------------------------------ text
    @staticmethod
    def _check_texts(texts) -> list:
        from tfemde.text import check_texts

        if isinstance(texts, np.ndarray) and texts.ndim != 1:
            raise ValueError(f"texts must be a 1-D sequence of strings [N]; got an array of shape {texts.shape}")
        return check_texts(texts)

    def tokenize(self, texts) -> tuple:
        """Token ids as the text encoder takes them.

        Args:
            texts: `N` strings.

        Returns:
            `(caption_ids [N, T] int32, caption_mask [N, T] bool)`: the training tokenizer's ids truncated to
            `max_length` and right-padded with 0 to the longest caption, `T = max(1, longest)`.
        """
        texts = self._check_texts(texts)
        ids, mask = self.tokenizer.encode(texts, self.max_length)
        width = max(1, int(mask.sum(axis=1).max())) if len(texts) else 1
        return ids[:, :width], mask[:, :width]

    def encode_texts(self, texts, batch_size: Optional[int] = None) -> Embeddings:
        """Encode captions (queries) into set embeddings.

        Args:
            texts: `N` strings (a list, tuple or 1-D array; not one bare string).
            batch_size: captions per onnxruntime call (default: the encoder's `batch_size`).

        Returns:
            `Embeddings` with `sets [N, K, D]` float32 (unit elements) and `sketches [N, S]` when the model has a
            sketch.

        Raises:
            ValueError: `texts` is one string, or an item is not a string.
        """
        texts = self._check_texts(texts)
        batch_size = self._check_batch_size(batch_size or self.batch_size)
        if not texts:
            return self._empty()
        if self.text_route == "e2e":
            batches = ({"text": np.array(texts[i:i + batch_size], dtype=object)}
                       for i in range(0, len(texts), batch_size))
            return self._run(mf.TEXT_E2E_ONNX, batches)
        ids, mask = self.tokenizer.encode(texts, self.max_length)
        # Captions of similar length share a batch, so little padding is computed; the order is restored after.
        order = np.argsort(mask.sum(axis=1), kind="stable")
        embeddings = self._encode_ids(ids[order], mask[order], batch_size)
        return embeddings.take(np.argsort(order, kind="stable"))

    def encode_token_ids(self, caption_ids, caption_mask=None, batch_size: Optional[int] = None) -> Embeddings:
        """Encode already tokenized captions (`[N, T]` int ids, 0 = padding) with `text.onnx`.

        Args:
            caption_ids: `[N, T]` integer ids from the export's tokenizer.
            caption_mask: `[N, T]` bool, True at real tokens; None means `caption_ids > 0`.
            batch_size: captions per onnxruntime call.

        Returns:
            `Embeddings` as `encode_texts`.
        """
        ids = np.asarray(caption_ids)
        if ids.ndim != 2 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"caption_ids must be integer ids of shape [N, T]; got shape {ids.shape} dtype "
                             f"{ids.dtype}")
        mask = ids > 0 if caption_mask is None else np.asarray(caption_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"caption_mask must have the shape of caption_ids {ids.shape}; got shape {mask.shape}")
        vocab_size = self.spec.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise ValueError(f"caption_ids must be token ids in [0, {vocab_size}) of the export's tokenizer; got "
                             f"{int(bad)}")
        return self._encode_ids(ids.astype(np.int32), mask.astype(bool), self._check_batch_size(
            batch_size or self.batch_size))

    def _encode_ids(self, ids, mask, batch_size) -> Embeddings:
        def batches():
            for i in range(0, len(ids), batch_size):
                m = mask[i:i + batch_size]
                width = max(1, int(m.sum(axis=1).max()))
                yield {"caption_ids": np.ascontiguousarray(ids[i:i + batch_size, :width]),
                       "caption_mask": np.ascontiguousarray(m[:, :width])}

        return self._run(mf.TEXT_ONNX, batches())

    # ------------------------------------------------------------------------------------------ images
    def _check_image_array(self, images: np.ndarray) -> None:
        """Raise naming the expected shape and type unless `images` is `[N, H, W, 3]` uint8 or float."""
        height, width = self.image_size
        expected = f"[N, {height}, {width}, 3] uint8 (0-255) or float in [0, 1]"
        if images.ndim != 4 or images.shape[1:] != (height, width, 3):
            hint = " (one image: add a batch axis, images[None])" if images.shape == (height, width, 3) else ""
            raise ValueError(f"images must have shape {expected}; got shape {images.shape}{hint}. Pass file paths "
                             "to have them resized.")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 (0-255) or float in [0, 1] with shape {expected}; got dtype "
                             f"{images.dtype}")

    def _image_array(self, images) -> np.ndarray:
        """Check `[n, H, W, 3]` uint8 or float in [0, 1] and return it as float32 in [0, 1]."""
        self._check_image_array(images)
        if images.dtype == np.uint8:
            return images.astype(np.float32) / np.float32(255.0)  # exactly the training pipeline's cast / 255
        images = images.astype(np.float32, copy=False)
        if images.size and not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
            raise ValueError(f"float images must lie in [0, 1] (uint8 / 255); got values in [{images.min()}, "
                             f"{images.max()}]")
        return images

    def encode_images(self, images, batch_size: Optional[int] = None) -> Embeddings:
        """Encode images into set embeddings.

        Args:
            images: for image models, a `[N, H, W, 3]` uint8 array (0-255; `/ 255` is applied) or float array in
                [0, 1] at the model's `image_size`, or a list of image file paths (read and resized like the
                training pipeline, see `tfemde.serving.images`). For region models, `[N, R, F]` region features
                (see `encode_regions` for a mask).
            batch_size: images per onnxruntime call.

        Returns:
            `Embeddings` with `sets [N, K, D]` and `sketches [N, S]` when the model has a sketch.

        Raises:
            ValueError: naming the expected shape or type when `images` does not fit the model.
        """
        batch_size = self._check_batch_size(batch_size or self.batch_size)
        if self.image_input == "regions":
            if _is_path(images) or (isinstance(images, (list, tuple)) and images and _is_path(images[0])):
                raise ValueError(f"this export's image encoder takes region features [N, R, {self.region_dim}] "
                                 "float32, not image files")
            return self.encode_regions(images, batch_size=batch_size)
        if _is_path(images):
            raise ValueError("images must be an array [N, H, W, 3] or a list of paths, not one path; wrap it in a "
                             "list: [path]")
        if isinstance(images, (list, tuple)) and images and all(_is_path(p) for p in images):
            from tfemde.serving.images import load_images

            paths = list(images)
            batches = ({"image": self._image_array(load_images(paths[i:i + batch_size], self.image_size))}
                       for i in range(0, len(paths), batch_size))
            return self._run(mf.IMAGE_ONNX, batches)
        if isinstance(images, (list, tuple)) and not images:
            return self._empty()
        try:
            array = np.asarray(images)
        except ValueError as error:
            raise ValueError(f"images must be an array [N, H, W, 3] or a list of paths; got {error}") from None
        if array.dtype == object:
            raise ValueError("images must be an array [N, H, W, 3] or a list of paths (str or os.PathLike); got a "
                             f"{type(images).__name__} of mixed or unsupported items")
        self._check_image_array(array)  # shape and dtype errors before any work
        if len(array) == 0:
            return self._empty()
        batches = ({"image": self._image_array(array[i:i + batch_size])} for i in range(0, len(array), batch_size))
        return self._run(mf.IMAGE_ONNX, batches)

    def encode_regions(self, regions, region_mask=None, batch_size: Optional[int] = None) -> Embeddings:
        """Encode precomputed region features (models exported with `image_input="regions"`).

        Args:
            regions: `[N, R, F]` float region features, `F = region_dim`; any R.
            region_mask: `[N, R]` bool (or 0/1), True at valid regions; None means all valid.
            batch_size: items per onnxruntime call.

        Returns:
            `Embeddings` with `sets [N, K, D]` (and `sketches [N, S]`).
        """
        if self.image_input != "regions":
            raise ValueError(f"this export's image encoder takes images [N, {self.image_size[0]}, "
                             f"{self.image_size[1]}, 3], not region features; use encode_images")
        batch_size = self._check_batch_size(batch_size or self.batch_size)
        regions = np.asarray(regions)
        if regions.ndim != 3 or regions.shape[2] != self.region_dim or not (
                np.issubdtype(regions.dtype, np.floating) or regions.size == 0):
            raise ValueError(f"regions must be float features of shape [N, R, {self.region_dim}]; got shape "
                             f"{regions.shape} dtype {regions.dtype}")
        mask = np.ones(regions.shape[:2], bool) if region_mask is None else np.asarray(region_mask)
        if mask.shape != regions.shape[:2]:
            raise ValueError(f"region_mask must have shape [N, R] = {regions.shape[:2]}; got shape {mask.shape}")
        regions = regions.astype(np.float32, copy=False)
        mask = mask.astype(bool, copy=False)
        batches = ({"regions": np.ascontiguousarray(regions[i:i + batch_size]),
                    "region_mask": np.ascontiguousarray(mask[i:i + batch_size])}
                   for i in range(0, len(regions), batch_size))
        return self._run(mf.IMAGE_ONNX, batches)
