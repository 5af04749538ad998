"""onnxruntime execution providers and sessions for the serving runtime (no TensorFlow).

`choose_providers` is a pure function of the provider list onnxruntime reports, so that the choice (CUDA when it
is there, the CPU otherwise) is testable on any machine.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies uint8 x int8 with VNNI (x86-64 `avx512_vnni` or `avx_vnni` in Linux's
    `/proc/cpuinfo` flags); False where that cannot be read (other systems: the int8 graphs' portable form)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return any(flag in value.split() for flag in VNNI_FLAGS)
    except OSError:
        pass
    return False


def choose_providers(available: Sequence[str], requested=None) -> list:
    """The execution providers to create sessions with, in priority order.

    Args:
        available: the provider names onnxruntime offers (`onnxruntime.get_available_providers()`).
        requested: None to choose automatically (CUDA then CPU when CUDA is available, else CPU alone); or a
            provider name, or a list of names or `(name, options)` pairs, used as given after checking that
            each one is available. The CPU provider is appended when missing, as the fallback for ops the
            others cannot run.

    Returns:
        A list of provider names (or `(name, options)` pairs) for `onnxruntime.InferenceSession(providers=...)`.

    Example:
        >>> choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
        ['CUDAExecutionProvider', 'CPUExecutionProvider']
        >>> choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"])
        ['CPUExecutionProvider']
    """
    available = list(available)
    if requested is None:
        return [CUDA, CPU] if CUDA in available else [CPU]
    if isinstance(requested, str) or (isinstance(requested, tuple) and len(requested) == 2
                                      and isinstance(requested[1], dict)):
        requested = [requested]
    chosen = []
    for entry in requested:
        name = entry[0] if isinstance(entry, (tuple, list)) else entry
        if not isinstance(name, str):
            raise ValueError(f"providers must be provider names or (name, options) pairs; got {entry!r}")
        if name not in available:
            raise ValueError(f"execution provider {name!r} is not available in this onnxruntime; available: "
                             f"{', '.join(available) or 'none'}")
        chosen.append(tuple(entry) if isinstance(entry, (tuple, list)) else entry)
    if not chosen:
        raise ValueError("providers must name at least one execution provider; got an empty list")
    if CPU not in [c[0] if isinstance(c, tuple) else c for c in chosen]:
        chosen.append(CPU)
    return chosen


# onnxruntime-gpu is published a little behind onnxruntime: its newest release when this was pinned.
ORT_GPU_VERSION = "1.31.1"
GPU_INSTALL = (f"pip uninstall -y onnxruntime onnxruntime-gpu && pip install --no-deps "
               f"onnxruntime-gpu=={ORT_GPU_VERSION}")


def installed_onnxruntime_wheels() -> dict:
    """`{distribution: version}` of the onnxruntime wheels installed (`onnxruntime`, `onnxruntime-gpu`)."""
    from importlib import metadata

    found = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def cuda_problem(available: Sequence[str], installed: dict) -> Optional[str]:
    """Why onnxruntime offers no CUDA provider where the GPU wheel was asked for, and what to do; None otherwise.

    Both wheels install the same `onnxruntime` folder, so `pip install tfemde[gpu]` (the base install pins the CPU
    wheel) leaves whichever was unpacked last, often the CPU one, without a word from pip.

    Args:
        available: `onnxruntime.get_available_providers()`.
        installed: `installed_onnxruntime_wheels()`.

    Example:
        >>> cuda_problem(["CPUExecutionProvider"], {"onnxruntime": "1.32.0"}) is None
        True
    """
    if CUDA in available or "onnxruntime-gpu" not in installed:
        return None
    if "onnxruntime" in installed:
        return (f"onnxruntime {installed['onnxruntime']} (CPU) and onnxruntime-gpu {installed['onnxruntime-gpu']} are "
                "both installed and share one folder; the CPU files shadow the GPU ones, so CUDA is not used. "
                f"Keep only the GPU wheel: {GPU_INSTALL}")
    return (f"onnxruntime-gpu {installed['onnxruntime-gpu']} is installed but offers no CUDA provider (available: "
            f"{', '.join(available) or 'none'}): the CUDA 12 / cuDNN 9 libraries it needs are missing or not on the "
            "library path (`pip install nvidia-cudnn-cu12 nvidia-cublas-cu12`, or see onnxruntime's CUDA "
            "requirements); serving falls back to the CPU")


def extensions_library_path() -> str:
    """The onnxruntime-extensions custom-op library, found without importing the package.

    `import onnxruntime_extensions` also imports `onnx` when it is installed (only its graph-building helpers
    need it); the serving runtime needs nothing but the shared library's path.
    """
    import glob
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_extensions")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("text_e2e.onnx needs onnxruntime-extensions: pip install onnxruntime-extensions==0.15.2")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "_extensions_pydll.*")))
        if found:
            return found[0]
    import onnxruntime_extensions  # an unusual layout: ask the package

    return onnxruntime_extensions.get_library_path()


def _tensorflow_loaded() -> bool:
    return sys.modules.get("tensorflow") is not None


def make_session(path, providers=None, custom_ops: bool = False, threads: Optional[int] = None,
                 spinning: bool = False):
    """An `onnxruntime.InferenceSession` for one ONNX model.

    Args:
        path: the `.onnx` file, or the model's bytes (what `Encoder.load` read and verified).
        providers: as for `choose_providers` (None: CUDA when available, else CPU).
        custom_ops: register the onnxruntime-extensions op library (needed by `text_e2e.onnx`).
        threads: intra-op threads (None: onnxruntime's default, one per core).
        spinning: keep the intra-op threads spin-waiting between calls too (onnxruntime's default). Off by
            default: the threads spin only while a call runs, between its parallel nodes (a text graph's
            recurrence runs one small parallel MatMul per step: waking sleeping threads there made the int8 text
            graph 5-8 % slower), and stop when it returns (`session.force_spinning_stop`), since on a machine
            shared with other work, threads spinning between calls took the cores from the ones doing the work
            (about 1.8x slower single-item calls on the 2-core benchmark box, and a quarter of a core spent
            per idle session). Turn it on for a dedicated server that answers calls back to back.

    Raises:
        RuntimeError: `custom_ops` in a process that has imported TensorFlow. Registering the
            onnxruntime-extensions library there crashes the process (onnxruntime 1.32, extensions 0.15.2,
            TensorFlow 2.21), so this refuses instead.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if not spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if custom_ops:
        if _tensorflow_loaded():
            raise RuntimeError(
                f"cannot load {'this model' if isinstance(path, (bytes, bytearray)) else path}: it needs the onnxruntime-extensions op library, and registering that library "
                "in a process that has imported TensorFlow crashes it. Use the sentencepiece text route "
                "(Encoder.load(..., text_route='sentencepiece')) or a process without TensorFlow.")
        options.register_custom_ops_library(extensions_library_path())
    chosen = choose_providers(ort.get_available_providers(), providers)
    model = bytes(path) if isinstance(path, (bytes, bytearray)) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=chosen)
