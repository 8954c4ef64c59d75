"""Latency of artifacts in their runtimes.

The method behind `care-q bench`, the bench's latency step and ptq's report (issue 21),
`measure_isolated`:

- one A/B per process: the artifacts compared (an int8 file and the FP32 file of its runtime)
  are loaded in a fresh child process (`run_isolated`) that loads nothing else, so no other
  interpreter's or session's thread pool, arena or spinning workers share the process;
- interleaved: after warm-up, rounds in which each artifact runs once, the order rotated every
  round (`rotations`), so drift of the machine hits both alike;
- in blocks (at least 3), each block in a fresh process, the blocks of all comparisons taken in
  turn (block 1 of every comparison, then block 2, ...): a comparison's blocks are spread over the
  whole measurement. A block's ratio is the artifact's median over the reference's median in that
  block, the overall ``ratio`` the median of the block ratios, and ``ratio_spread`` their min and
  max. (The quotient of the medians over all rounds fell outside the blocks' range when blocks
  ran under different load; the median of the block ratios cannot.) A spread wider than the effect
  is a measurement that says nothing.

Why blocks in separate processes, spread in time (issue 21, measured on the shared 2-core
machine): blocks inside one process agreed with each other (e.g. 0.49-0.53, 0.74-0.81) while
the same pair in four processes within a minute gave 0.32 to 0.76 (care_s0 TFLite): other load and
the process itself move the ratio more than anything inside one process, so a spread taken
inside one process understated the uncertainty.

`measure` and `measure_rotated` (all runners in the calling process, one block) stay for callers
that time a single artifact or do not compare.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from care_q.errors import CareQError
from care_q.utils.machine import OtherLoad

MIN_BLOCKS = 3


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


def _warm(runners: dict, x: np.ndarray, warmup: int) -> None:
    for r in runners.values():
        r.prepare(x)
        for _ in range(warmup):
            r.invoke()


def _rounds(runners: dict, n: int, clock, advance=None, start: int = 0) -> dict[str, list[float]]:
    """``n`` interleaved rounds (rotated order, the rotation continuing from round ``start``):
    name -> the ms of each round, in round order."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for order in rotations(list(runners), start + n)[start:]:
        for k in order:
            r = runners[k]
            t0 = clock()
            r.invoke()
            times[k].append((clock() - t0) * 1e3)
        if advance is not None:
            advance(1)
    return times


def _stats(v: list[float]) -> dict:
    a = np.asarray(v, dtype=np.float64)
    return {**summarize(v), "mean_ms": float(a.mean()), "min_ms": float(a.min())}


def measure_rotated(runners: dict, x: np.ndarray, runs: int = 50, warmup: int = 5, advance=None,
                    clock=time.perf_counter) -> dict[str, dict]:
    """Like `measure`, with the order rotated every round (see `rotations`) and a progress
    callback ``advance(1)`` after every round. Returns name -> {median_ms, p90_ms, mean_ms,
    min_ms, runs}; ``clock`` is injectable for tests."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    _warm(runners, x, warmup)
    return {k: _stats(v) for k, v in _rounds(runners, runs, clock, advance).items()}


def block_sizes(runs: int, blocks: int) -> int:
    """Rounds per block so that ``blocks`` blocks hold at least ``runs`` rounds."""
    return max(1, math.ceil(runs / blocks))


def measure_blocks(runners: dict, x: np.ndarray, *, reference: str | None = None, blocks: int = MIN_BLOCKS,
                   runs: int = 10, warmup: int = 5, clock=time.perf_counter, advance=None) -> dict[str, dict]:
    """Interleaved rounds in ``blocks`` consecutive blocks of ``runs`` rounds each, in this process.

    Returns name -> {median_ms, p90_ms, mean_ms, min_ms, runs (all rounds), block_median_ms: one
    per block} and, with ``reference`` (a name in ``runners``), for every name: ``block_ratios`` (its
    median over the reference's in each block), ``ratio`` (their median) and ``ratio_spread``
    [min, max] of the block ratios.
    """
    if runs < 1 or blocks < 1:
        raise CareQError(f"runs and blocks must be >= 1, got runs={runs}, blocks={blocks}")
    if reference is not None and reference not in runners:
        raise CareQError(f"reference '{reference}' is not one of the runners {sorted(runners)}")
    _warm(runners, x, warmup)
    return summarize_blocks([_rounds(runners, runs, clock, advance, start=b * runs) for b in range(blocks)], reference)


def summarize_blocks(per_block: list[dict[str, list[float]]], reference: str | None = None) -> dict[str, dict]:
    """The statistics of `measure_blocks` from each block's times (name -> ms per round); a name
    missing from some block is left out."""
    names = [k for k in per_block[0] if all(k in b for b in per_block)] if per_block else []
    if reference not in names:
        reference = None
    out = {}
    for k in names:
        all_ms = [t for blk in per_block for t in blk[k]]
        out[k] = {**_stats(all_ms), "blocks": len(per_block),
                  "block_median_ms": [float(np.median(b[k])) for b in per_block]}
        if reference is not None:
            block_ratios = [float(np.median(b[k]) / np.median(b[reference])) for b in per_block]
            out[k].update(ratio=float(np.median(block_ratios)), block_ratios=block_ratios,
                          ratio_spread=[min(block_ratios), max(block_ratios)], reference=reference)
    return out


def _block_in_child(factories: dict, x: np.ndarray, runs: int, warmup: int, start: int, clock) -> dict:
    """In a child: build each runner (one that fails to load is reported under ``load_failures``),
    warm them up, then one block of ``runs`` interleaved rounds: name -> ms per round."""
    runners, failures = {}, {}
    for name, make in factories.items():
        try:
            runners[name] = make()
        except Exception as e:  # a runtime's own exception types: reported per artifact
            failures[name] = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
    _warm(runners, x, warmup)
    return {"times": _rounds(runners, runs, clock, start=start), "load_failures": failures, "pid": os.getpid()}


def measure_isolated(jobs: dict[str, tuple[dict[str, Callable], str | None]], x: np.ndarray, *,
                     blocks: int = MIN_BLOCKS, runs: int = 10, warmup: int = 5, clock=time.perf_counter,
                     timeout: float | None = None, advance=None) -> dict[str, dict]:
    """Each comparison of ``jobs`` (key -> (factories, reference)) in processes of its own, one
    fresh process per block: block 1 of every job, one after the other, then block 2 of every job,
    ... so that a job's blocks are spread over the whole measurement and its spread shows what
    changed meanwhile, between processes included (see the module docstring).

    ``factories``: name -> a picklable callable that returns a runner in the child (e.g.
    ``functools.partial(care_q.runtime.load_runner, path, threads=2)``); ``reference``: the name
    the ratios are taken against, or None. ``advance(1)`` after every process. Returns key ->
    {"results": name -> `summarize_blocks` stats plus ``other_cpu_share`` (the share of the cores
    other processes took while its blocks ran), "load_failures": name -> message, "pids": one per
    block, "error": why its process died (its blocks stop there; None if it did not)}.
    """
    if blocks < MIN_BLOCKS:
        raise CareQError(f"a latency comparison needs at least {MIN_BLOCKS} blocks, got {blocks}")
    if runs < 1:
        raise CareQError(f"runs must be >= 1, got {runs}")
    state = {k: {"times": [], "load_failures": {}, "pids": [], "shares": [], "error": None} for k in jobs}
    for b in range(blocks):
        for key, (factories, _) in jobs.items():
            st = state[key]
            if st["error"] is None:
                load = OtherLoad()
                try:
                    r = run_isolated(_block_in_child, factories, x, runs, warmup, b * runs, clock, timeout=timeout,
                                     what=f"timing {', '.join(factories)}")
                except CareQError as e:
                    st["error"] = str(e)
                else:
                    st["times"].append(r["times"])
                    st["load_failures"].update(r["load_failures"])
                    st["pids"].append(r["pid"])
                    st["shares"].append(load.share())
            if advance is not None:
                advance(1)
    out = {}
    for key, (_, reference) in jobs.items():
        st = state[key]
        res = summarize_blocks(st["times"], reference) if st["error"] is None else {}
        shares = [v for v in st["shares"] if v is not None]
        for v in res.values():
            v["other_cpu_share"] = float(np.mean(shares)) if shares else None
        out[key] = {"results": res, "load_failures": st["load_failures"], "pids": st["pids"], "error": st["error"]}
    return out


def run_isolated(fn: Callable, *args, timeout: float | None = None, what: str = "", **kwargs):
    """``fn(*args, **kwargs)`` in a fresh Python process (``python -m care_q.utils.timing``), which
    imports only what unpickling ``fn`` and its arguments needs, with this process's ``sys.path``.
    Returns its result; a child that raises, dies or runs past ``timeout`` s is a CareQError."""
    blob = pickle.dumps((fn, args, kwargs))
    with tempfile.TemporaryDirectory(prefix="care_q_isolated_") as tmp:
        result = Path(tmp) / "result.pickle"
        try:
            p = subprocess.run([sys.executable, "-m", "care_q.utils.timing", str(result)],
                               input=pickle.dumps((list(sys.path), blob)), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CareQError(f"{what or 'isolated run'}: still running after {timeout} s; stopped") from None
        if not result.exists():
            lines = [ln for ln in p.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            detail = lines[-1].strip()[:300] if lines else "no output"
            raise CareQError(f"{what or 'isolated run'}: the child process exited with code {p.returncode} "
                             f"({detail})")
        ok, value = pickle.loads(result.read_bytes())
    if not ok:
        raise CareQError(f"{what or 'isolated run'}: {value}")
    return value


def _child_main(result_path: str) -> None:
    sys_path, blob = pickle.loads(sys.stdin.buffer.read())
    sys.path[:] = sys_path
    try:
        fn, args, kwargs = pickle.loads(blob)
        out = (True, fn(*args, **kwargs))
    except Exception as e:  # reported in the parent as a CareQError
        text = str(e).strip()
        out = (False, f"{type(e).__name__}: {text.splitlines()[0][:400] if text else ''}")
    tmp = Path(result_path + ".tmp")
    tmp.write_bytes(pickle.dumps(out))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    _child_main(sys.argv[1])
