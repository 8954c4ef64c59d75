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


def rotations(names: list, runs: int) -> list[list]:
    """The order of every round: round r starts at name r mod n (A B C, B C A, C A B, ...), so
    no artifact always runs first (after the previous round's slowest) or last."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(runs)] if n else []


def measure_rotated(runners: dict, x: np.ndarray, runs: int = 50, warmup: int = 5, advance=None,
                    clock=time.perf_counter) -> dict[str, dict]:
    """Like `measure`, with the order rotated every round (see `rotations`) and a progress
    callback ``advance(1)`` after every round. Returns name -> {median_ms, p90_ms, mean_ms,
    min_ms, runs}; ``clock`` is injectable for tests."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for r in runners.values():
        r.prepare(x)
        for _ in range(warmup):
            r.invoke()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for order in rotations(list(runners), runs):
        for k in order:
            r = runners[k]
            t0 = clock()
            r.invoke()
            times[k].append((clock() - t0) * 1e3)
        if advance is not None:
            advance(1)
    out = {}
    for k, v in times.items():
        a = np.asarray(v, dtype=np.float64)
        out[k] = {**summarize(v), "mean_ms": float(a.mean()), "min_ms": float(a.min())}
    return out
