"""`care_q.bench.host.bench(...)`: latency, size and peak memory of artifacts on this machine.

    res = bench("out/s0", threads=2, runs=50)
    res["latency"]["tflite/xnnpack"]["care_s0_int8.tflite"]["ratio"]

Settings: every .onnx runs in onnxruntime's CPU EP (``onnxruntime``), every .tflite once per
TFLite delegate asked for (``tflite/xnnpack``; ``tflite/builtin``: TFLite's own CPU kernels,
no delegate; ``tflite/reference``: the reference kernels, very slow). Within one setting and
input shape the artifacts are timed together: warm-up, then rounds in which each runs once, the
order rotated every round (`care_q.bench.latency.measure_rotated`), so machine drift hits all
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

from care_q.errors import CareQError

TFLITE_DELEGATES = ("xnnpack", "builtin", "reference")


def _load() -> float | None:
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
        import resource

        r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(x.ru_utime + x.ru_stime for x in r)

    def share(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.monotonic() - self.t0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        other = (busy - self.busy0) - (self._own() - self.own0)
        return round(max(0.0, other) / max(wall * cores, 1e-9), 3)


def busy_warning(res: dict) -> str | None:
    """A warning when other processes took more than 15% of the cores during the measurement
    (older results without that figure: the 1-minute load average above the core count)."""
    other = res.get("other_cpu_share")
    if other is not None:
        if other > 0.15:
            return (f"other processes used {100 * other:.0f}% of the cores during this measurement: latencies are "
                    f"inflated and noisy; rerun on an idle machine for numbers to quote")
        return None
    loads = [v for v in (res.get("load_avg") or {}).values() if v is not None]
    cores = (res.get("machine") or {}).get("usable_cores") or os.cpu_count() or 1
    if loads and max(loads) > cores:
        return (f"the machine was busy during this measurement (load average up to {max(loads):.1f} on {cores} cores): "
                f"latencies are inflated and noisy; rerun on an idle machine for numbers to quote")
    return None


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
    from care_q.bench.latency import measure_rotated
    from care_q.bench.machine import machine_info
    from care_q.bench.memory import bench_input, probe
    from care_q.data import progress_bar
    from care_q.eval.census import detect_source
    from care_q.eval.evaluate import find_artifacts
    from care_q.runtime import load_runner

    t_start = time.time()
    if threads < 1 or runs < 1 or warmup < 0:
        raise CareQError(f"threads and runs must be >= 1 and warmup >= 0 (got {threads}, {runs}, {warmup})")
    bad = [d for d in tflite_delegates if d not in TFLITE_DELEGATES]
    if bad or not tflite_delegates:
        raise CareQError(f"unknown TFLite delegate(s) {bad or list(tflite_delegates)}; choose from {list(TFLITE_DELEGATES)}")
    arts = find_artifacts(artifacts)
    entries: dict[str, dict] = {}
    for name, a in arts.items():
        path = a["path"]
        try:
            runner = load_runner(path, threads=threads)
        except CareQError as e:
            raise CareQError(f"artifact {name} does not load: {e}") from None
        src = a["source"] or detect_source(path)
        e = {"path": str(path), "kind": runner.kind, "source": src, "size_bytes": path.stat().st_size,
             "input_shape": [d or 1 for d in runner.input_shape]}
        if census:
            from care_q.eval.census import artifact_census

            try:
                e["census"] = artifact_census(path, runner=runner if runner.kind == "tflite" else None)
            except CareQError as err:
                e["census"] = {"error": str(err)}
        entries[name] = e
        del runner

    # --- peak memory, and the crash check, in child processes (one per artifact and setting)
    settings: list[tuple[str, str, str | None]] = []  # (setting, kind, delegate)
    if any(e["kind"] == "onnx" for e in entries.values()):
        settings.append(("onnxruntime", "onnx", None))
    if any(e["kind"] == "tflite" for e in entries.values()):
        settings += [(f"tflite/{d}", "tflite", d) for d in tflite_delegates]
    failures: dict[str, dict[str, dict]] = {s: {} for s, _, _ in settings}  # setting -> artifact -> failure
    checks = [(n, s, d) for n, e in entries.items() for s, k, d in settings if k == e["kind"]] if memory else []
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

    # --- latency, one interleaved measurement per (setting, input shape)
    load_start = _load()
    other_load = OtherLoad()
    latency: dict[str, dict] = {}
    for setting, kind, delegate in settings:
        members = {n: e for n, e in entries.items() if e["kind"] == kind and n not in failures[setting]}
        shapes = sorted({tuple(e["input_shape"]) for e in members.values()})
        n_runs = runs if delegate in (None, "xnnpack") else (slow_runs or runs)
        res_setting: dict[str, dict] = {}
        for shape in shapes:
            runners = {}
            for n, e in members.items():
                if tuple(e["input_shape"]) != shape:
                    continue
                try:
                    runners[n] = load_runner(e["path"], threads=threads,
                                             **({"tflite_delegate": delegate} if delegate else {}))
                except CareQError as err:
                    failures[setting][n] = {"type": "error", "message": str(err)[:400], "stage": f"load ({setting})"}
            if not runners:
                continue
            x = bench_input(shape, seed)
            with progress_bar(f"latency {setting} {shape[2]}x{shape[3]}", n_runs, enabled=progress) as advance:
                m = measure_rotated(runners, x, runs=n_runs, warmup=warmup, advance=advance)
            del runners
            for n, stats in m.items():
                ref = _pick_fp32(n, kind, list(shape), entries)
                stats["fp32"] = ref
                stats["ratio"] = (stats["median_ms"] / m[ref]["median_ms"]) if ref in m else None
                res_setting[n] = stats
        latency[setting] = res_setting
    for n, e in entries.items():
        ref = _pick_fp32(n, e["kind"], e["input_shape"], entries)
        e["fp32"] = ref
        e["size_ratio"] = e["size_bytes"] / entries[ref]["size_bytes"] if ref else None

    res = {"command": "bench", "threads": threads, "runs": runs, "slow_runs": slow_runs or runs, "warmup": warmup,
           "batch": 1, "tflite_delegates": list(tflite_delegates), "artifacts": entries, "latency": latency,
           "latency_failures": {k: v for k, v in failures.items() if v},
           "load_avg": {"start": load_start, "end": _load()}, "other_cpu_share": other_load.share(),
           "device": None, "machine": machine_info(),
           "seconds": round(time.time() - t_start, 1)}
    if out is not None and report:
        from care_q.eval.report import write_report

        write_report(res, out)
    return res
