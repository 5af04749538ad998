"""`export_run`: a trained dual encoder to one checked export folder, written to a temporary path, moved into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from tfemde.export.convert import DEFAULT_OPSET, SUPPORTED_OPSETS, _name_dims
from tfemde.export.describe import _dumps, _manifest
from tfemde.export.native_rnn import NATIVE, convert_encoder
from tfemde.export.quantize import inline_loop_weights, int8_name, quantize_int8, vnni_name, write_vnni_copy
from tfemde.export.signatures import _functions, _save_saved_model, _specs
from tfemde.export.tokenizer_graph import text_e2e_model
from tfemde.export.verify import _verify
from tfemde.files import make_folder_beside, move_folder_into_place
from tfemde.serving import manifest as mf


def _resolve(run_dir_or_model, tokenizer):
    """`(model, config, tokenizer, source)` from a run folder, an opened `Run`, or a `DualEncoder` + tokenizer."""
    from tfemde.text import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.load(tokenizer)
    elif tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"tokenizer must be a tfemde.text.Tokenizer, a .model path or None; got "
                         f"{type(tokenizer).__name__}")
    source = None
    if isinstance(run_dir_or_model, (str, os.PathLike)):
        from tfemde.models.run_folder import open_run

        run_dir_or_model = open_run(run_dir_or_model)
    if all(hasattr(run_dir_or_model, a) for a in ("path", "config", "tokenizer", "model")):  # a Run
        run = run_dir_or_model
        source = str(run.path)
        model, tokenizer = run.model, tokenizer or run.tokenizer
        config = getattr(model, "config", None) or run.config  # what the saved model was built with
    else:
        model = run_dir_or_model
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "image_encoder") or not hasattr(model, "text_encoder"):
            raise ValueError("run_dir_or_model must be a run folder, a tfemde.training.runs.Run or a tfemde DualEncoder; got "
                             f"{type(model).__name__}")
        if tokenizer is None:
            raise ValueError("exporting a model (not a run folder) needs tokenizer=: its training Tokenizer or "
                             "tokenizer.model path")
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds only config.vocab_size="
                         f"{config.vocab_size}; they do not belong together")
    return model, config, tokenizer, source


def _check_out_dir(out_dir: Path):
    """Refuse an `out_dir` that is a file, or a non-empty folder that is not exactly a complete tfemde export.

    An existing export is replaced as a whole, so it must hold nothing but what its manifest lists: a folder with a
    stray `manifest.json` and a user's files beside it is refused, never deleted.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    refuse = (f"out_dir {str(out_dir)!r} exists, is not empty and is not a tfemde export ({{}}); choose another "
              "folder (an existing export is replaced)")
    try:
        manifest = mf.read_manifest(out_dir)
    except mf.ExportFileError as error:
        raise ValueError(refuse.format(error)) from None
    listed = set(manifest["files"]) | {mf.MANIFEST_NAME}
    folders = {parent.as_posix() for name in listed for parent in Path(name).parents if parent != Path(".")}
    for path in sorted(out_dir.rglob("*")):
        name = path.relative_to(out_dir).as_posix()
        # A folder is the export's when a listed file is below it, or it sits inside one (saved_model/assets/).
        ours = name in folders or (path.parent != out_dir and path.parent.relative_to(out_dir).as_posix() in folders)
        if path.is_symlink() or (path.is_dir() and not ours) or (not path.is_dir() and name not in listed):
            raise ValueError(refuse.format(f"{name!r} is not a file of its manifest"))


def _move_into_place(tmp: Path, out_dir: Path):
    # an earlier export is checked again now (it may have changed while exporting), then swapped out
    move_folder_into_place(tmp, out_dir, _check_out_dir)


def export_run(run_dir_or_model, out_dir, opset: int = DEFAULT_OPSET, tokenizer=None,
               quantize: bool = False, native_rnn: bool = True) -> Path:
    """Export a trained dual encoder's two encoders to ONNX and SavedModel, checked against TensorFlow.

    Args:
        run_dir_or_model: a run folder (`config.json`, `tokenizer.model`, `best.keras`), an opened
            `tfemde.training.runs.Run`, or a `DualEncoder` (then `tokenizer` is required).
        out_dir: the export folder to write. An existing export there is replaced; any other non-empty folder
            is refused.
        opset: the ONNX opset, 13 to 18 (tf2onnx 1.17's range).
        tokenizer: the training `Tokenizer` (or its `.model` path); defaults to the run's.
        quantize: also write `image.int8.onnx` and `text.int8.onnx` (8-bit weights, faster on CPUs, not exact:
            each must keep a cosine of at least `INT8_MIN_COSINE` to TensorFlow's outputs) and their copies for
            CPUs with VNNI, `*.int8.vnni.onnx`. Load them with `Encoder.load(export_dir, precision="int8")`.
        native_rnn: run the BiGRUs as ONNX `GRU` ops (onnxruntime's own kernel; `tfemde.export.native_rnn`);
            False keeps tf2onnx's `Loop`s. The manifest's `recurrence` says which each graph has.

    Returns:
        `out_dir` as a `Path`, holding `image.onnx`, `text.onnx`, `text_e2e.onnx`, `saved_model/`,
        `tokenizer.model` and `manifest.json` (see the module docstring).

    Raises:
        ExportError: the converter could not map an op, or an exported graph differs from TensorFlow by more than
            1e-4, or `text_e2e.onnx` tokenizes differently from the training tokenizer. `out_dir` is untouched.
        ValueError, FileNotFoundError: bad arguments (an incomplete run folder, an unsupported opset, ...).

    Example:
        >>> # export_dir = export_run("runs/quickstart/dive_temde", "exports/dive_temde")
        >>> # from tfemde.serving import Encoder; Encoder.load(export_dir).encode_texts(["a red heart"])
    """
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or int(opset) not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be an int from {SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[-1]} (tf2onnx 1.17); "
                         f"got {opset!r}")
    opset = int(opset)
    if not isinstance(quantize, bool):
        raise ValueError(f"quantize must be True or False; got {quantize!r}")
    if not isinstance(native_rnn, bool):
        raise ValueError(f"native_rnn must be True or False; got {native_rnn!r}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    model, config, tokenizer, source = _resolve(run_dir_or_model, tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_folder_beside(out_dir, prefix=f".{out_dir.name}.", suffix=".tmp")
    try:
        import onnx

        image_specs, text_specs, dims = _specs(config)
        image_fn, text_fn = _functions(model, config)
        _save_saved_model(tmp / mf.SAVED_MODEL_DIR, model, image_fn, text_fn, image_specs, text_specs)
        encoders = {mf.IMAGE_ONNX: (image_fn, image_specs, model.image_encoder, "image encoder"),
                    mf.TEXT_ONNX: (text_fn, text_specs, model.text_encoder, "text encoder")}
        protos, recurrence = {}, {}
        for name, (fn, specs, encoder, what) in encoders.items():
            proto, recurrence[name] = convert_encoder(fn, specs, encoder, opset, dims, what=what,
                                                      recurrence="gru" if native_rnn else "tf2onnx")
            # Loops carry their weights as loop state; as body constants they run ~20% faster.
            protos[name] = inline_loop_weights(proto)
        e2e_proto = text_e2e_model(protos[mf.TEXT_ONNX], tokenizer.model_proto, config.max_length, opset)
        _name_dims(e2e_proto, dims)
        recurrence[mf.TEXT_E2E_ONNX] = recurrence[mf.TEXT_ONNX]
        for name, proto in (*protos.items(), (mf.TEXT_E2E_ONNX, e2e_proto)):
            proto.doc_string = f"tfemde {config.preset} {name.split('.')[0]} encoder; see manifest.json"
            onnx.save_model(proto, str(tmp / name))
        tokenizer.save(tmp / mf.TOKENIZER_FILE)
        if quantize:
            for name, (fn, specs, encoder, what) in encoders.items():
                float_graph = tmp / name
                if recurrence[name] == NATIVE:
                    # onnxruntime has no int8 GRU kernel: a float GRU reads 4x the bytes of int8 recurrent
                    # weights, so the int8 graph is quantized from the lean Scan form of the same recurrence.
                    scan, recurrence[int8_name(name)] = convert_encoder(fn, specs, encoder, opset, dims, what=what,
                                                                        recurrence="scan")
                    float_graph = tmp / f".scan.{name}"
                    onnx.save_model(scan, str(float_graph))
                else:
                    recurrence[int8_name(name)] = recurrence[name]
                quantize_int8(float_graph, tmp / int8_name(name))
                write_vnni_copy(tmp / int8_name(name), tmp / vnni_name(name))
                recurrence[vnni_name(name)] = recurrence[int8_name(name)]
                if float_graph.name.startswith(".scan."):
                    float_graph.unlink()
        verification = _verify(tmp, image_fn, text_fn, config, tokenizer, quantized=quantize)
        manifest = _manifest(config, tokenizer, opset, verification, source)
        manifest["recurrence"] = recurrence
        manifest["files"] = mf.file_records(tmp)
        mf.Manifest.from_dict(manifest, "this export")  # what readers need is there (one schema, both sides)
        (tmp / mf.MANIFEST_NAME).write_text(_dumps(manifest), encoding="utf-8")
        _move_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
