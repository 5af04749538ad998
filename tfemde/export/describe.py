"""The `manifest.json` an export writes: inputs, outputs, embedding, similarity, preprocessing, versions, checks.

File names, the format name and version, and the checksum records come from `tfemde.serving.manifest`, which
reads the same file on the serving side.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
import sys

from tfemde.export.quantize import METHOD as QUANTIZATION_METHOD
from tfemde.export.quantize import int8_name, vnni_name
from tfemde.export.signatures import IMAGE_SIGNATURE, TEXT_SIGNATURE
from tfemde.export.tokenizer_graph import CONTRIB_DOMAIN
from tfemde.serving import manifest as mf

_VERSIONED_PACKAGES = ("tfemde", "tensorflow", "keras", "tensorflow-text", "tf2onnx", "onnx", "onnxruntime",
                       "onnxruntime-extensions", "sentencepiece", "numpy", "protobuf", "pillow")


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _io(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


def _normalization(model_proto: bytes) -> str:
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(model_proto)
    return m.normalizer_spec.name


def _dumps(manifest: dict) -> str:
    """Indented JSON with the short lists of scalars (shapes, sizes) kept on one line."""
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    return re.sub(r"\[\s*\n\s*([^\[\]{}]*?)\s*\n\s*\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]",
                  text) + "\n"


def _manifest(config, tokenizer, opset, verification, source) -> dict:
    manifest = _base_manifest(config, tokenizer, opset, verification, source)
    if "int8" in verification:
        manifest["quantized"] = {
            "method": QUANTIZATION_METHOD,
            "image": {"file": int8_name(mf.IMAGE_ONNX), "vnni_file": vnni_name(mf.IMAGE_ONNX), "of": mf.IMAGE_ONNX,
                      **verification["int8"][int8_name(mf.IMAGE_ONNX)]},
            "text": {"file": int8_name(mf.TEXT_ONNX), "vnni_file": vnni_name(mf.TEXT_ONNX), "of": mf.TEXT_ONNX,
                     **verification["int8"][int8_name(mf.TEXT_ONNX)]},
        }
    return manifest


def _base_manifest(config, tokenizer, opset, verification, source) -> dict:
    k, d = config.set_size, config.embed_dim
    outputs = [_io("set", "float32", ["batch", k, d])]
    if config.sketch:
        outputs.append(_io("sketch", "float32", ["batch", config.sketch_size]))
    if config.image_input == "regions":
        image_inputs = [_io("regions", "float32", ["batch", "regions", config.region_dim]),
                        _io("region_mask", "bool", ["batch", "regions"])]
        image = {"input": "regions", "num_regions": config.num_regions, "region_dim": config.region_dim,
                 "preprocessing": "precomputed region features [regions, region_dim] float32 (e.g. bottom-up "
                                  "attention); region_mask True at valid regions; any number of regions"}
    else:
        size = config.image_size
        image_inputs = [_io("image", "float32", ["batch", size, size, 3])]
        image = {"input": config.image_input, "size": [size, size], "channels": "RGB", "dtype": "float32",
                 "range": [0.0, 1.0], "backbone": config.backbone,
                 "preprocessing": "decode (PNG transparency composited over white; other formats to RGB); resize "
                                  f"to {size}x{size} (squashed, aspect ratio not kept) with bilinear interpolation, "
                                  "antialiased when downsampling; round half to even and clip to uint8; divide "
                                  "by 255 to float32 in [0, 1]. The ONNX and SavedModel inputs take the float "
                                  "image; tfemde.serving.Encoder.encode_images takes uint8 arrays or files."}
    text_inputs = [_io("caption_ids", "int32", ["batch", "tokens"]), _io("caption_mask", "bool", ["batch", "tokens"])]
    token_outputs = [_io("token_ids", "int32", ["batch", "tokens"]), _io("token_mask", "bool", ["batch", "tokens"])]
    sketch_weight = float(config.sketch_weight) if config.sketch else 0.0
    return {
        "format": mf.FORMAT_NAME,
        "version": mf.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "opset": opset,
        "preset": config.preset,
        "config": config.to_dict(),
        "embedding": {"set_size": k, "dim": d, "sketch": bool(config.sketch),
                      "sketch_size": config.sketch_size, "sketch_depth": config.sketch_depth if config.sketch else None,
                      "sketch_bits": config.sketch_bits if config.sketch else None,
                      "normalized": "every set element has unit L2 norm; each of the sketch_depth rows of the "
                                    "sketch [sketch_depth, 2**sketch_bits] too"},
        "similarity": {
            "name": "smooth_chamfer+sketch" if config.sketch else "smooth_chamfer",
            "alpha": float(config.alpha), "sketch_weight": sketch_weight,
            "formula": "s(X, Y) = 1/(2α|X|) Σ_x log Σ_y exp(α<x,y>) + 1/(2α|Y|) Σ_y log Σ_x exp(α<x,y>) "
                       "+ sketch_weight · <sketch_x, sketch_y> / sketch_depth",
            "implementation": "tfemde.serving.similarity",
        },
        "image": image,
        "text": {"max_length": config.max_length, "tokenizer": mf.TOKENIZER_FILE, "type": "sentencepiece",
                 "vocab_size": tokenizer.vocab_size, "pad_id": 0, "normalization": _normalization(
                     tokenizer.model_proto),
                 "truncation": "keep the first max_length ids",
                 "padding": "right, with id 0 and caption_mask False; text_e2e.onnx and the Encoder pad to the "
                            "longest caption of the batch (at most max_length); padded positions change nothing"},
        "models": {
            "image": {"file": mf.IMAGE_ONNX, "inputs": image_inputs, "outputs": outputs},
            "text": {"file": mf.TEXT_ONNX, "inputs": text_inputs, "outputs": outputs},
            "text_e2e": {"file": mf.TEXT_E2E_ONNX, "inputs": [_io("text", "string", ["batch"])],
                         "outputs": outputs + token_outputs,
                         "custom_ops": f"onnxruntime-extensions ({CONTRIB_DOMAIN}: SentencepieceTokenizer)"},
        },
        "saved_model": {"path": mf.SAVED_MODEL_DIR,
                        "signatures": {IMAGE_SIGNATURE: {"inputs": image_inputs, "outputs": outputs},
                                       TEXT_SIGNATURE: {"inputs": text_inputs, "outputs": outputs}}},
        "versions": _versions(),
        "verification": verification,
    }
