"""Latency of artifacts in their runtimes: interleaved rounds, median and p90 after warm-up.

Runs are interleaved (A, B, A, B, ...) so machine drift hits every artifact equally.
"""

from __future__ import annotations

import time

import numpy as np


def measure(runners: dict, x: np.ndarray, runs: int = 50, warmup: int = 5) -> dict[str, dict]:
    """runners: name -> care_q.runtime.Runner. Returns name -> {median_ms, p90_ms, runs}."""
    for r in runners.values():
        r.prepare(x)
        for _ in range(warmup):
            r.invoke()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for k, r in runners.items():
            t0 = time.perf_counter()
            r.invoke()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: summarize(v) for k, v in times.items()}


def summarize(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "runs": int(a.size)}
