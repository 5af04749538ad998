"""The export folder's `manifest.json`: its schema (`Manifest`), reading it, and checking every file's sha256.

An export folder (written by `tfemde.export.export_run`) holds `image.onnx`, `text.onnx`, `text_e2e.onnx`,
`tokenizer.model`, `saved_model/` and `manifest.json`. The manifest records, for every other file, its size and
sha256, so that a reader can tell a complete, unchanged export from a damaged one before using it. NumPy-free and
TensorFlow-free: the standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "tfemde.export"
FORMAT_VERSION = 1

IMAGE_ONNX = "image.onnx"
TEXT_ONNX = "text.onnx"
TEXT_E2E_ONNX = "text_e2e.onnx"
TOKENIZER_FILE = "tokenizer.model"
SAVED_MODEL_DIR = "saved_model"


class ExportFileError(ValueError):
    """An export folder or one of its files is missing, corrupt or changed since export (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The fields of an export's `manifest.json` that readers use, typed and checked (`Manifest.from_dict`).

    `tfemde.export` writes the JSON and checks it with `from_dict` before the export is moved into place;
    `Encoder`, `SetIndex` and the CLI read it through `from_dict`, so writer and readers share one schema. The whole
    JSON object (descriptions, versions, verification) stays available as `raw`.

    Attributes:
        preset: the config preset the model was built from.
        set_size, dim: K and D of the set embeddings `[N, K, D]`.
        sketch_size, sketch_depth: S and the depth of the sketches `[N, S]` (0 and None without a sketch).
        alpha, sketch_weight: the similarity's α and λ (λ is 0 without a sketch).
        max_length, vocab_size: captions are truncated to `max_length` ids below `vocab_size`.
        image_input: `"pixels"`, `"backbone"` (images `[N, H, W, 3]`) or `"regions"` (features `[N, R, F]`).
        image_size: `(H, W)` for image models, None for region models.
        region_dim: F for region models, None for image models.
        int8_files: `{float graph: its int8 graph}` of a quantized export, else `{}`.
        int8_vnni_files: `{float graph: its int8 graph with int8 weights}` for CPUs with VNNI (exports before
            2026-12-06 have none: `{}`).
        files: `{relative path: {"sha256", "bytes"}}` of every other file of the export.
        raw: the whole manifest as read.
    """

    preset: str
    set_size: int
    dim: int
    sketch_size: int
    sketch_depth: Optional[int]
    alpha: float
    sketch_weight: float
    max_length: int
    vocab_size: int
    image_input: str
    image_size: Optional[Tuple[int, int]]
    region_dim: Optional[int]
    int8_files: Dict[str, str]
    int8_vnni_files: Dict[str, str]
    files: Dict[str, dict]
    raw: dict = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, manifest: dict, where: str = "the export") -> "Manifest":
        """Check and type a manifest dict.

        Raises:
            ExportFileError: a field is missing or of the wrong type (the message names it and `where`).
        """

        def get(path: str, kind, optional: bool = False):
            value = manifest
            for key in path.split("."):
                value = value.get(key) if isinstance(value, dict) else None
            if value is None and optional:
                return None
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ExportFileError(f"the {MANIFEST_NAME} of {where} has no valid {path!r} (expected {expected}, "
                                      f"got {value!r}); re-export the model with this tfemde")
            return value

        if not isinstance(manifest, dict):
            raise ExportFileError(f"the {MANIFEST_NAME} of {where} is not a JSON object")
        sketch = get("embedding.sketch", bool)
        image_input = get("image.input", str)
        regions = image_input == "regions"
        size = None if regions else get("image.size", list)
        if size is not None and (len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)):
            raise ExportFileError(f"the {MANIFEST_NAME} of {where} has no valid 'image.size' (expected [H, W]; got "
                                  f"{size!r}); re-export the model with this tfemde")
        quantized = get("quantized", dict, optional=True) or {}
        int8_files, int8_vnni_files = {}, {}
        for what in ("image", "text") if quantized else ():
            int8_files[get(f"quantized.{what}.of", str)] = get(f"quantized.{what}.file", str)
            vnni_file = get(f"quantized.{what}.vnni_file", str, optional=True)
            if vnni_file is not None:
                int8_vnni_files[get(f"quantized.{what}.of", str)] = vnni_file
        return cls(
            preset=get("preset", str),
            set_size=get("embedding.set_size", int),
            dim=get("embedding.dim", int),
            sketch_size=get("embedding.sketch_size", int) if sketch else 0,
            sketch_depth=get("embedding.sketch_depth", int) if sketch else None,
            alpha=float(get("similarity.alpha", (int, float))),
            sketch_weight=float(get("similarity.sketch_weight", (int, float))) if sketch else 0.0,
            max_length=get("text.max_length", int),
            vocab_size=get("text.vocab_size", int),
            image_input=image_input,
            image_size=None if size is None else (size[0], size[1]),
            region_dim=get("image.region_dim", int) if regions else None,
            int8_files=int8_files,
            int8_vnni_files=int8_vnni_files,
            files=get("files", dict),
            raw=manifest,
        )


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def export_digest(manifest: dict) -> str:
    """The identity of an export: a sha256 of its manifest (which holds every file's checksum), key order aside."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def contained_path(folder, name) -> Path:
    """`folder / name` for a manifest's relative POSIX `name` that stays inside `folder`, symbolic links followed.

    Raises:
        ExportFileError: `name` is not a string, is absolute, has a `..` part, or resolves outside `folder`.
    """
    folder = Path(folder)
    parts = name.split("/") if isinstance(name, str) else None
    if not parts or name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise ExportFileError(f"the {MANIFEST_NAME} of {str(folder)!r} names the file {name!r}, which is not a "
                              "relative path inside the export folder; the manifest was not written by tfemde export")
    root = os.path.realpath(folder)
    resolved = os.path.realpath(folder / name)
    if os.path.commonpath([root, resolved]) != root:
        raise ExportFileError(f"export file {name!r} in {str(folder)!r} resolves to {resolved!r}, outside the "
                              "export folder; refusing to read it")
    return folder / name


def file_records(folder, exclude: Iterable[str] = (MANIFEST_NAME,)) -> dict:
    """`{relative POSIX path: {"sha256", "bytes"}}` of every file under `folder`, sorted by path."""
    folder = Path(folder)
    exclude = set(exclude)
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in exclude:
            records[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return records


def read_manifest(export_dir) -> dict:
    """Read and check the `manifest.json` of an export folder.

    Args:
        export_dir: a folder written by `tfemde.export.export_run`.

    Returns:
        The manifest as a dict (`Manifest.from_dict` gives its typed fields).

    Raises:
        ExportFileError: the folder or its manifest is missing, unreadable, of another format or version, or
            lacks a field readers use.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ExportFileError(f"export folder {str(export_dir)!r} does not exist (expected a folder written by "
                              "`tfemde export`)")
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ExportFileError(f"{str(export_dir)!r} is not a tfemde export: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFileError(f"export file {MANIFEST_NAME!r} in {str(export_dir)!r} is corrupt: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ExportFileError(f"export file {MANIFEST_NAME!r} in {str(export_dir)!r} is not a {FORMAT_NAME} "
                              "manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExportFileError(f"export {str(export_dir)!r} has format version {manifest.get('version')!r}; this "
                              f"tfemde reads version {FORMAT_VERSION}. Re-export it with this tfemde.")
    if not isinstance(manifest.get("files"), dict):
        raise ExportFileError(f"export file {MANIFEST_NAME!r} in {str(export_dir)!r} has no 'files' checksums")
    for name in manifest["files"]:
        contained_path(export_dir, name)
    Manifest.from_dict(manifest, repr(str(export_dir)))  # every field a reader uses is there, with its type
    quantized = manifest.get("quantized") or {}
    for what in ("image", "text") if quantized else ():
        entry = quantized.get(what)
        listed = isinstance(entry, dict) and entry.get("file") in manifest["files"]
        if not listed or entry.get("of") != {"image": IMAGE_ONNX, "text": TEXT_ONNX}[what]:
            raise ExportFileError(f"the {MANIFEST_NAME} of {str(export_dir)!r} has a quantized {what!r} entry whose "
                                  "file is not one of the export's checksummed files; re-export the model")
    return manifest


def verify_files(export_dir, manifest: dict, names: Optional[Iterable[str]] = None) -> None:
    """Check files of an export against the sizes and sha256 checksums in its manifest.

    Args:
        export_dir: the export folder.
        manifest: its manifest (`read_manifest`).
        names: the relative paths to check (e.g. `["image.onnx"]`); None checks every file the manifest lists.
            A name under a folder listed in the manifest (`"saved_model"`) checks every file below it.

    Raises:
        ExportFileError: naming the first file that is missing, not listed, outside the folder, or whose checksum
            does not match.
    """
    _check_files(export_dir, manifest, names, keep=False)


def read_verified(export_dir, manifest: dict, names: Iterable[str]) -> dict:
    """`{name: bytes}` of export files read once and checked against the manifest (as `verify_files`).

    A reader that runs these bytes runs what was verified, even if the folder is replaced afterwards.
    """
    return _check_files(export_dir, manifest, names, keep=True)


def _check_files(export_dir, manifest, names, keep):
    export_dir = Path(export_dir)
    records = manifest["files"]
    if names is None:
        wanted = list(records)
    else:
        wanted = []
        for name in names:
            below = [n for n in records if n.startswith(name.rstrip("/") + "/")]
            if name not in records and not below:
                raise ExportFileError(f"export file {name!r} is not listed in the {MANIFEST_NAME} of "
                                      f"{str(export_dir)!r}")
            wanted.extend([name] if name in records else below)
    contents = {}
    for name in wanted:
        record = records[name]
        path = contained_path(export_dir, name)
        if not path.is_file():
            raise ExportFileError(f"export file {name!r} is missing from {str(export_dir)!r} (the manifest lists "
                                  "it); re-export the model")
        if keep:
            data = path.read_bytes()
            size, actual = len(data), hashlib.sha256(data).hexdigest()
            contents[name] = data
        else:
            size, actual = os.path.getsize(path), sha256_file(path)
        if actual != record.get("sha256"):
            detail = f"{size} bytes, expected {record.get('bytes')}" if size != record.get("bytes") else \
                "same size, different content"
            raise ExportFileError(f"export file {name!r} in {str(export_dir)!r} is corrupt or was changed: its "
                                  f"sha256 checksum does not match the manifest (expected "
                                  f"{str(record.get('sha256'))[:16]}…, got {actual[:16]}…; {detail}). "
                                  "Re-export the model.")
    return contents
