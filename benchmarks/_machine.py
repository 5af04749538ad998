"""What every benchmark prints about the machine it ran on: CPU model and the flags that change kernels, cores,
memory, load, date and Python. Speed figures are only comparable side by side on one machine; this says which."""

from __future__ import annotations

import datetime
import os
import platform

# The instruction sets that select different onnxruntime / oneDNN kernels (int8 results differ without VNNI).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list:
    """Which of `FLAGS` the CPU has."""
    present = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in FLAGS if flag in present]


def memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def describe() -> str:
    """One line: date, host, CPU model and flags, cores, memory, load average, OS and Python."""
    return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | {platform.node()} | {cpu_model()} "
            f"[{' '.join(cpu_flags()) or 'no AVX2'}] | {os.cpu_count()} cores | {memory_gib():.1f} GiB | load "
            f"{load_average()} | {platform.system()} {platform.release()} | Python {platform.python_version()}")


if __name__ == "__main__":
    print(describe())
