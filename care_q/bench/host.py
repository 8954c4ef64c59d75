"""`care_q.bench.host.bench(...)`: latency, size and peak memory of artifacts on this machine.

    res = bench("out/s0", threads=2, runs=50)
    res["latency"]["tflite/xnnpack"]["care_s0_int8.tflite"]["ratio"]

Settings: every .onnx runs in onnxruntime's CPU EP (``onnxruntime``), every .tflite once per
TFLite delegate asked for (``tflite/xnnpack``; ``tflite/builtin``: TFLite's own CPU kernels,
no delegate; ``tflite/reference``: the reference kernels, very slow). Within one setting and
input shape the artifacts are timed together: warm-up, then rounds in which each runs once, the
order rotated every round (`care_q.utils.timing.measure_rotated`), so machine drift hits all
alike; median and p90 over the rounds. ``ratio`` is the median over that of the FP32 artifact
of the same runtime and input shape (a file named ``*fp32*``, else one without quantize ops).

Before timing, each artifact runs in a child process that measures its peak memory
(`care_q.bench.memory.probe`); an artifact whose runtime crashes there is reported as failed
and left out of the timing, so it cannot take the benchmark down.

On-device numbers (``--device adb:...``) are another engineer's module; its results go under
``res["device"]`` (None here) and the report renders them when present.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from care_q.bench.memory import bench_input, probe
from care_q.data import progress_bar
from care_q.errors import CareQError
from care_q.eval.census import artifact_census, detect_source
from care_q.eval.evaluate import find_artifacts
from care_q.eval.report import write_report
from care_q.runtime import TFLITE_DELEGATES, load_runner
from care_q.utils.machine import OtherLoad, load_avg, machine_info
from care_q.utils.timing import measure_rotated


def _is_fp32(entry: dict) -> bool:
    return entry["source"] == "fp32"


def _pick_fp32(name: str, kind: str, shape, entries: dict) -> str | None:
    """The FP32 artifact of the same runtime and input shape, best matching ``name``'s prefix."""
    cands = [n for n, e in entries.items() if e["kind"] == kind and _is_fp32(e) and e["input_shape"] == shape
             and "failure" not in e]
    if not cands:
        return None
    return max(cands, key=lambda c: (len(os.path.commonprefix([c, name])), c))


def bench(artifacts, *, threads: int = 2, runs: int = 50, warmup: int = 10,
          tflite_delegates=("xnnpack", "builtin"), slow_runs: int | None = None, memory: bool = True,
          census: bool = True, seed: int = 0, progress: bool | None = None, out=None,
          report: bool = True) -> dict:
    """Benchmark every artifact (a folder, a list of paths or name -> path | {"path", "source"}).

    ``slow_runs``: rounds for the slow TFLite settings (builtin, reference); default ``runs``.
    Writes report.md / .json / .html to ``out`` when given.
    """
    t_start = time.time()
    if threads < 1 or runs < 1 or warmup < 0:
        raise CareQError(f"threads and runs must be >= 1 and warmup >= 0 (got {threads}, {runs}, {warmup})")
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
                                      warmup=warmup, seed=seed, progress=progress)
               for setting, kind, delegate in settings}
    for n, e in entries.items():
        ref = _pick_fp32(n, e["kind"], e["input_shape"], entries)
        e["fp32"] = ref
        e["size_ratio"] = e["size_bytes"] / entries[ref]["size_bytes"] if ref else None

    res = {"command": "bench", "threads": threads, "runs": runs, "slow_runs": slow_runs or runs, "warmup": warmup,
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


def _time_setting(entries: dict, failed: dict, setting: str, kind: str, delegate: str | None, *, threads: int,
                  runs: int, warmup: int, seed: int, progress) -> dict[str, dict]:
    """One interleaved measurement per input shape of the setting's artifacts (those not in
    ``failed``; a runner that does not load is added there)."""
    members = {n: e for n, e in entries.items() if e["kind"] == kind and n not in failed}
    out: dict[str, dict] = {}
    for shape in sorted({tuple(e["input_shape"]) for e in members.values()}):
        runners = {}
        for n, e in members.items():
            if tuple(e["input_shape"]) != shape:
                continue
            try:
                runners[n] = load_runner(e["path"], threads=threads, **({"tflite_delegate": delegate} if delegate else {}))
            except CareQError as err:
                failed[n] = {"type": "error", "message": str(err)[:400], "stage": f"load ({setting})"}
        if not runners:
            continue
        x = bench_input(shape, seed)
        with progress_bar(f"latency {setting} {shape[2]}x{shape[3]}", runs, enabled=progress) as advance:
            m = measure_rotated(runners, x, runs=runs, warmup=warmup, advance=advance)
        del runners
        for n, stats in m.items():
            ref = _pick_fp32(n, kind, list(shape), entries)
            stats["fp32"] = ref
            stats["ratio"] = (stats["median_ms"] / m[ref]["median_ms"]) if ref in m else None
            out[n] = stats
    return out
