"""`care_q.bench.host.bench(...)`: latency, size and peak memory of artifacts on this machine.

    res = bench("out/s0", threads=2, runs=60, blocks=3)
    res["latency"]["tflite/xnnpack"]["care_s0_int8.tflite"]["ratio"]          # and ["ratio_spread"]

Settings: every .onnx runs in onnxruntime's CPU EP (``onnxruntime``), every .tflite once per
TFLite delegate asked for (``tflite/xnnpack``; ``tflite/builtin``: TFLite's own CPU kernels,
no delegate; ``tflite/reference``: the reference kernels, very slow).

Latency (issue 21): every int8 artifact is timed against the FP32 artifact of the same runtime and
input shape (a file named ``*fp32*``, else one without quantize ops) in child processes that load
only those two (`care_q.utils.timing.measure_isolated`): ``runs`` interleaved rounds (order rotated
each round) in ``blocks`` blocks, each block in a fresh process after its own warm-up, the blocks of
all pairs of a setting taken in turn, so that each pair's blocks spread over the whole measurement.
``block_ratios``: the int8 median over the FP32 median in each block, ``ratio``: their median,
``ratio_spread``: their min and max (``median_ms``, ``fp32_median_ms``: over all rounds);
``other_cpu_share``: the share of the cores other processes took while its blocks ran. An FP32
artifact's entry: the median of its statistics over its pairs. The former method (every artifact of
a setting in one process, one block) could not show how much a ratio moves between processes and
over time; on the shared 2-core machine of issue 21 the same pair's ratio moved more that way than
between process setups.

Before timing, each artifact runs in a child process that measures its peak memory
(`care_q.bench.memory.probe`); an artifact whose runtime crashes there is reported as failed
and left out of the timing, so it cannot take the benchmark down.

On-device numbers (``--device adb:...``) are another engineer's module; its results go under
``res["device"]`` (None here) and the report renders them when present.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import numpy as np

from care_q.bench.memory import bench_input, probe
from care_q.data import progress_bar
from care_q.errors import CareQError
from care_q.eval.census import artifact_census, detect_source
from care_q.eval.evaluate import find_artifacts
from care_q.eval.report import write_report
from care_q.runtime import TFLITE_DELEGATES, load_runner
from care_q.utils.machine import OtherLoad, load_avg, machine_info
from care_q.utils.timing import MIN_BLOCKS, block_sizes, measure_isolated

BLOCK_TIMEOUT_S = 1800  # one block's process (load, warm-up, rounds); a runtime that hangs is a failure


def _is_fp32(entry: dict) -> bool:
    return entry["source"] == "fp32"


def _pick_fp32(name: str, kind: str, shape, entries: dict) -> str | None:
    """The FP32 artifact of the same runtime and input shape, best matching ``name``'s prefix."""
    cands = [n for n, e in entries.items() if e["kind"] == kind and _is_fp32(e) and e["input_shape"] == shape
             and "failure" not in e]
    if not cands:
        return None
    return max(cands, key=lambda c: (len(os.path.commonprefix([c, name])), c))


def bench(artifacts, *, threads: int = 2, runs: int = 60, blocks: int = MIN_BLOCKS, warmup: int = 10,
          tflite_delegates=("xnnpack", "builtin"), slow_runs: int | None = None, memory: bool = True,
          census: bool = True, seed: int = 0, progress: bool | None = None, out=None,
          report: bool = True) -> dict:
    """Benchmark every artifact (a folder, a list of paths or name -> path | {"path", "source"}).

    ``runs``: timed rounds per comparison, split into ``blocks`` (>= 3) blocks; ``slow_runs``: the
    same for the slow TFLite settings (builtin, reference); default ``runs``.
    Writes report.md / .json / .html to ``out`` when given.
    """
    t_start = time.time()
    if threads < 1 or runs < 1 or warmup < 0 or blocks < MIN_BLOCKS:
        raise CareQError(f"threads and runs must be >= 1, blocks >= {MIN_BLOCKS} and warmup >= 0 "
                         f"(got threads={threads}, runs={runs}, blocks={blocks}, warmup={warmup})")
    bad = [d for d in tflite_delegates if d not in TFLITE_DELEGATES]
    if bad or not tflite_delegates:
        raise CareQError(f"unknown TFLite delegate(s) {bad or list(tflite_delegates)}; choose from {list(TFLITE_DELEGATES)}")
    entries = {name: _describe(name, a, threads, census) for name, a in find_artifacts(artifacts).items()}
    settings: list[tuple[str, str, str | None]] = []  # (setting, kind, delegate)
    if any(e["kind"] == "onnx" for e in entries.values()):
        settings.append(("onnxruntime", "onnx", None))
    if any(e["kind"] == "tflite" for e in entries.values()):
        settings += [(f"tflite/{d}", "tflite", d) for d in tflite_delegates]
    failures = _probe_memory(entries, settings, threads, progress) if memory else {s: {} for s, _, _ in settings}
    load_start = load_avg()
    other_load = OtherLoad()
    latency = {setting: _time_setting(entries, failures[setting], setting, kind, delegate, threads=threads,
                                      runs=runs if delegate in (None, "xnnpack") else (slow_runs or runs),
                                      blocks=blocks, warmup=warmup, seed=seed, progress=progress)
               for setting, kind, delegate in settings}
    for n, e in entries.items():
        ref = _pick_fp32(n, e["kind"], e["input_shape"], entries)
        e["fp32"] = ref
        e["size_ratio"] = e["size_bytes"] / entries[ref]["size_bytes"] if ref else None

    res = {"command": "bench", "threads": threads, "runs": runs, "slow_runs": slow_runs or runs, "warmup": warmup,
           "blocks": blocks, "rounds_per_block": block_sizes(runs, blocks), "method": "isolated_pairs",
           "batch": 1, "tflite_delegates": list(tflite_delegates), "artifacts": entries, "latency": latency,
           "latency_failures": {k: v for k, v in failures.items() if v},
           "load_avg": {"start": load_start, "end": load_avg()}, "other_cpu_share": other_load.share(),
           "device": None, "machine": machine_info(),
           "seconds": round(time.time() - t_start, 1)}
    if out is not None and report:
        write_report(res, out)
    return res


def _describe(name: str, a: dict, threads: int, census: bool) -> dict:
    """One artifact's entry: path, runtime, FP32 or int8, size, input shape, census."""
    path: Path = a["path"]
    try:
        runner = load_runner(path, threads=threads)
    except CareQError as e:
        raise CareQError(f"artifact {name} does not load: {e}") from None
    e = {"path": str(path), "kind": runner.kind, "source": a["source"] or detect_source(path),
         "size_bytes": path.stat().st_size, "input_shape": [d or 1 for d in runner.input_shape]}
    if census:
        try:
            e["census"] = artifact_census(path, runner=runner if runner.kind == "tflite" else None)
        except CareQError as err:
            e["census"] = {"error": str(err)}
    return e


def _probe_memory(entries: dict, settings: list, threads: int, progress) -> dict[str, dict[str, dict]]:
    """Peak memory, and the crash check, in child processes (one per artifact and setting):
    the memory goes into ``entries`` (default delegate), the failures are returned per setting."""
    failures: dict[str, dict[str, dict]] = {s: {} for s, _, _ in settings}  # setting -> artifact -> failure
    checks = [(n, s, d) for n, e in entries.items() for s, k, d in settings if k == e["kind"]]
    with progress_bar("memory / crash check", len(checks), enabled=progress) as advance:
        for name, setting, delegate in checks:
            e = entries[name]
            m = probe(e["path"], delegate=delegate or "xnnpack", threads=threads)
            default = delegate in (None, "xnnpack")
            if m.get("ok") and default:
                e["memory"] = {k: m[k] for k in ("baseline_mb", "peak_mb", "delta_mb")}
            elif not m.get("ok"):
                failures[setting][name] = {**m["failure"], "stage": f"first inference ({setting})"}
                if default:
                    e["failure"] = failures[setting][name]
            advance(1)
    return failures


def _jobs(members: dict, kind: str, shape, entries: dict) -> list[tuple[str | None, list[str]]]:
    """The A/B pairs of one setting and input shape: (FP32 reference, [reference, artifact]) for
    every artifact with an FP32 of its runtime, (None, [artifact]) for the others, and an FP32
    that no artifact is compared with alone."""
    jobs, paired = [], set()
    for n in members:
        if _is_fp32(entries[n]):
            continue
        ref = _pick_fp32(n, kind, list(shape), entries)
        if ref in members:
            jobs.append((ref, [ref, n]))
            paired.add(ref)
        else:
            jobs.append((None, [n]))
    jobs += [(None, [n]) for n in members if _is_fp32(entries[n]) and n not in paired]
    return jobs


def _time_setting(entries: dict, failed: dict, setting: str, kind: str, delegate: str | None, *, threads: int,
                  runs: int, blocks: int, warmup: int, seed: int, progress) -> dict[str, dict]:
    """Every int8 artifact of the setting (those not in ``failed``) against its FP32, each pair in
    processes of its own (`care_q.utils.timing.measure_isolated`: ``blocks`` blocks, a fresh process
    each, ``runs`` rounds in all); an artifact that does not load or whose process dies is added to
    ``failed``. An FP32 artifact's entry holds the median over its pairs of its statistics."""
    members = {n: e for n, e in entries.items() if e["kind"] == kind and n not in failed}
    out: dict[str, dict] = {}
    kw = {"tflite_delegate": delegate} if delegate else {}
    for shape in sorted({tuple(e["input_shape"]) for e in members.values()}):
        group = {n: e for n, e in members.items() if tuple(e["input_shape"]) == shape}
        jobs = {names[-1]: ({n: partial(load_runner, entries[n]["path"], threads=threads, **kw) for n in names}, ref)
                for ref, names in _jobs(group, kind, shape, entries)}
        with progress_bar(f"latency {setting} {shape[2]}x{shape[3]}", blocks * len(jobs), enabled=progress) as advance:
            measured = measure_isolated(jobs, bench_input(shape, seed), blocks=blocks, runs=block_sizes(runs, blocks),
                                        warmup=warmup, advance=advance, timeout=BLOCK_TIMEOUT_S)
        fp32_runs: dict[str, list[dict]] = {}
        for key, m in measured.items():
            names, ref = list(jobs[key][0]), jobs[key][1]
            if m["error"]:
                for n in names[1:] if ref else names:
                    failed[n] = {"type": "error", "message": m["error"][:400], "stage": f"timing ({setting})"}
            for n, msg in m["load_failures"].items():
                failed[n] = {"type": "error", "message": msg, "stage": f"load ({setting})"}
            res = m["results"]
            if ref in res:
                fp32_runs.setdefault(ref, []).append(res[ref])
            out.update({n: _entry(n, ref, res, entries) for n in names if n in res and n != ref})
        for n, pairs in fp32_runs.items():
            out[n] = _fp32_entry(n, pairs)
    return {n: out[n] for n in members if n in out}  # the artifacts' order


def _entry(name: str, ref: str | None, res: dict, entries: dict) -> dict:
    """An artifact's result from its processes: against ``ref`` when that was measured with it."""
    e = dict(res[name])
    if ref in res:
        return {**e, "fp32": ref, "fp32_median_ms": res[ref]["median_ms"]}
    for k in ("block_ratios", "ratio_spread", "reference"):
        e.pop(k, None)
    own = _is_fp32(entries[name])  # an FP32 timed alone is its own reference
    return {**e, "fp32": name if own else None, "ratio": 1.0 if own else None}


def _fp32_entry(name: str, pairs: list[dict]) -> dict:
    """An FP32 artifact timed once per int8 artifact it is compared with: the median of each
    statistic over those runs, ratio 1."""
    keys = ("median_ms", "p90_ms", "mean_ms", "min_ms")
    e = {k: float(np.median([p[k] for p in pairs])) for k in keys}
    return {**e, "runs": int(sum(p["runs"] for p in pairs)), "blocks": pairs[0]["blocks"], "pairs": len(pairs),
            "ratio": 1.0, "ratio_spread": [1.0, 1.0], "fp32": name}
