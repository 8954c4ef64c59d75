"""The machine a measurement ran on (CPU model, cores, memory, OS, library versions) and how busy
it was (load average, other processes' share of the cores, and the warning a report prints when
that share inflates latencies). Below `care_q.eval` and `care_q.bench`: both report it."""

from __future__ import annotations

import functools
import os
import platform
import resource
import time
from importlib import metadata

PACKAGES = ("care-q", "torch", "onnx", "onnxruntime", "ai-edge-litert", "litert-torch", "nncf",
            "ai-edge-quantizer", "numpy")
BUSY_SHARE = 0.15  # other processes' share of the cores above which a latency report warns


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field: value`` line of Linux's /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(field):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_model() -> str:
    name = _cpuinfo("model name")
    return name.strip() if name is not None else (platform.processor() or platform.machine())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo, read once); empty where they cannot be read."""
    return frozenset((_cpuinfo("flags") or "").split())


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


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU model, logical cores (and those this process may use), memory, OS, Python, versions."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cores(), "memory_gb": memory_gb(),
            "platform": platform.platform(), "python": platform.python_version(), "load_avg": load,
            "versions": versions()}


def describe(m: dict) -> str:
    """One line: 'AMD EPYC ... , 2 cores, 23.4 GB, Linux-..., Python 3.11.x'."""
    return (f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gb']} GB RAM, "
            f"{m['platform']}, Python {m['python']}")


def load_avg() -> float | None:
    """The 1-minute load average (other processes competing for the cores inflate latency)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class OtherLoad:
    """CPU time that other processes took during a measurement, as a share of all cores' time:
    the machine's busy time (/proc/stat) minus this process's own (and its waited-for children's).
    The load average cannot tell: it counts the benchmark's own threads and the steps before it."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(x.ru_utime + x.ru_stime for x in r)

    def share(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.monotonic() - self.t0
        other = (busy - self.busy0) - (self._own() - self.own0)
        return round(max(0.0, other) / max(wall * usable_cores(), 1e-9), 3)


def busy_warning(res: dict) -> str | None:
    """A warning when other processes took more than 15% of the cores during the measurement
    (older results without that figure: the 1-minute load average above the core count)."""
    other = res.get("other_cpu_share")
    if other is not None:
        if other > BUSY_SHARE:
            return (f"other processes used {100 * other:.0f}% of the cores during this measurement: latencies are "
                    f"inflated and noisy; rerun on an idle machine for numbers to quote")
        return None
    loads = [v for v in (res.get("load_avg") or {}).values() if v is not None]
    cores = (res.get("machine") or {}).get("usable_cores") or os.cpu_count() or 1
    if loads and max(loads) > cores:
        return (f"the machine was busy during this measurement (load average up to {max(loads):.1f} on {cores} cores): "
                f"latencies are inflated and noisy; rerun on an idle machine for numbers to quote")
    return None
