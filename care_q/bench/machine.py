"""The machine a measurement ran on: CPU model, cores, memory, OS, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = ("care-q", "torch", "onnx", "onnxruntime", "ai-edge-litert", "litert-torch", "nncf",
            "ai-edge-quantizer", "numpy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages=PACKAGES) -> dict[str, str | None]:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    """CPU model, logical cores (and those this process may use), memory, OS, Python, versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "memory_gb": memory_gb(),
            "platform": platform.platform(), "python": platform.python_version(), "load_avg": load,
            "versions": versions()}


def describe(m: dict) -> str:
    """One line: 'AMD EPYC ... , 2 cores, 23.4 GB, Linux-..., Python 3.11.x'."""
    return (f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gb']} GB RAM, "
            f"{m['platform']}, Python {m['python']}")
