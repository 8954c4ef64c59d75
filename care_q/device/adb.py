"""On-device latency with the user's TFLite ``benchmark_model`` binary, over adb.

    res = run_device_bench({"fp32": "out/s0_fp32.tflite", "int8": "out/s0_int8.tflite"},
                           serial=None, binary="benchmark_model", delegate="nnapi", threads=4, runs=50)
    res["results"]["int8"]["avg_ms"], res["results"]["int8"]["delegate"]["kernels"]

What it runs (every command goes through ``runner``, ``subprocess.run`` by default):

1. ``adb [-s SERIAL] shell mkdir -p /data/local/tmp/care_q``;
2. ``adb push`` of the binary (then ``chmod 755``) and of each artifact;
3. ``rounds`` rounds; each round runs every artifact once, in order (FP32, INT8, FP32, INT8, ...),
   ``adb shell <binary> --graph=... --num_threads=N --num_runs=K --warmup_runs=W --min_secs=0
   --warmup_min_secs=0 --report_peak_memory_footprint=true`` plus the delegate flag
   (``--use_xnnpack=true`` | ``--use_nnapi=true`` | ``--use_gpu=true``), so that drift (thermal
   throttling, other apps) hits every artifact alike;
4. ``parse_benchmark_output`` on each run's output, then per artifact: the average over all timed
   runs, the pooled standard deviation, min/max, the median of the rounds' averages, init time,
   memory footprint and the delegate's kernel count.

``benchmark_model``'s output (tflite/tools/benchmark/benchmark_model.cc, benchmark_tflite_model.cc):

    count=5 first=10392 curr=9875 min=9858 max=10392 avg=9969.6 std=207          (warm-up runs)
    count=50 first=9875 curr=9850 min=9790 max=10510 avg=9901.3 std=112          (timed runs)
    Inference timings in us: Init: 51234, First inference: 10392, Warmup (avg): 9969.6, Inference (avg): 9901.3
    Explicitly applied NNAPI delegate, and the model graph will be partially executed by the delegate w/ 3 delegate kernels.
    Memory footprint delta from the start of the tool (MB): init=6.1 overall=9.8
    Overall peak memory footprint (MB) via periodic monitoring: 11.2
"""

from __future__ import annotations

import math
import re
import shlex
import statistics
import subprocess
from pathlib import Path

from care_q.errors import CareQError

DEVICE_DIR = "/data/local/tmp/care_q"
DELEGATES = ("xnnpack", "nnapi", "gpu")
_DELEGATE_FLAGS = {"xnnpack": ["--use_xnnpack=true"], "nnapi": ["--use_nnapi=true"], "gpu": ["--use_gpu=true"]}

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_TIMINGS_RE = re.compile(rf"Inference timings in us:\s*Init:\s*{_NUM},\s*First inference:\s*{_NUM},"
                         rf"\s*Warmup \(avg\):\s*{_NUM},\s*Inference \(avg\):\s*{_NUM}")
_STATS_RE = re.compile(r"\bcount=(\d+)((?:\s+\w+=[-+\d.eE]+)*)")
_KV_RE = re.compile(rf"(\w+)={_NUM}")
_MEM_DELTA_RE = re.compile(rf"Memory footprint delta from the start of the tool \(MB\):\s*init={_NUM}\s+overall={_NUM}")
_PEAK_RE = re.compile(rf"Overall peak memory footprint \(MB\)[^:]*:\s*{_NUM}")
_DELEGATE_RE = re.compile(r"Explicitly applied (\S+) delegate, and the model graph will be (completely|partially) "
                          r"executed by the delegate(?: w/ (\d+) delegate kernels)?")
_NOT_DELEGATED_RE = re.compile(r"Though (\S+) delegate is explicitly applied, the model graph will not be")
_INIT_SESSION_RE = re.compile(rf"Initialized session in {_NUM}\s*ms")
_MODEL_SIZE_RE = re.compile(rf"The input model file size \(MB\):\s*{_NUM}")


# ----------------------------------------------------------------------------- parsing
def parse_benchmark_output(text: str) -> dict:
    """Parse one ``benchmark_model`` run's output (stdout + stderr, or logcat lines).

    Returns ``init_us``, ``first_inference_us``, ``warmup_avg_us``, ``inference_avg_us`` (the
    "Inference timings in us" line), ``runs`` (the timed runs' ``count= first= curr= min= max=
    avg= std=`` fields; ``warmup`` the warm-up line's when two are printed), ``memory``
    (``init_mb``, ``overall_mb``, ``peak_mb``; absent fields are None), ``delegate`` (``name``,
    ``mode`` completely | partially | none, ``kernels``; None when no delegate line) and
    ``model_size_mb``. Raises CareQError when the timings line is missing.
    """
    m = _TIMINGS_RE.search(text)
    if m is None:
        tail = " | ".join(ln.strip() for ln in text.strip().splitlines()[-5:])
        raise CareQError("benchmark_model output has no 'Inference timings in us: ...' line; "
                         f"the run failed or the binary is not TFLite's benchmark_model (last lines: {tail[:400]})")
    out: dict = {"init_us": float(m.group(1)), "first_inference_us": float(m.group(2)),
                 "warmup_avg_us": float(m.group(3)), "inference_avg_us": float(m.group(4))}
    # The run statistics follow each "Running benchmark for at least ..." line (warm-up, then timed
    # runs); op-profiling tables print "Timings (microseconds): count=..." lines, which are skipped.
    stats = []
    after_running = False
    for line in text.splitlines():
        if "Running benchmark for at least" in line:
            after_running = True
            continue
        s = _STATS_RE.search(line)
        if not s or "Timings (microseconds)" in line or "Memory (bytes)" in line:
            continue
        if after_running or "Running benchmark for at least" not in text:
            d = {"count": int(s.group(1))}
            d.update({k: float(v) for k, v in _KV_RE.findall(s.group(2))})
            stats.append(d)
            after_running = False
    out["warmup"] = stats[-2] if len(stats) >= 2 else None
    out["runs"] = stats[-1] if stats else None
    mem = {"init_mb": None, "overall_mb": None, "peak_mb": None}
    md = _MEM_DELTA_RE.search(text)
    if md:
        mem["init_mb"], mem["overall_mb"] = float(md.group(1)), float(md.group(2))
    pk = _PEAK_RE.search(text)
    if pk:
        mem["peak_mb"] = float(pk.group(1))
    out["memory"] = mem
    dl = _DELEGATE_RE.search(text)
    if dl:
        out["delegate"] = {"name": dl.group(1), "mode": dl.group(2),
                           "kernels": int(dl.group(3)) if dl.group(3) else (1 if dl.group(2) == "completely" else None)}
    else:
        nd = _NOT_DELEGATED_RE.search(text)
        out["delegate"] = {"name": nd.group(1), "mode": "none", "kernels": 0} if nd else None
    ms = _MODEL_SIZE_RE.search(text)
    out["model_size_mb"] = float(ms.group(1)) if ms else None
    return out


# ----------------------------------------------------------------------------- commands
def parse_device(spec: str) -> str | None:
    """'adb' -> None (the only attached device), 'adb:SERIAL' -> SERIAL."""
    if spec == "adb":
        return None
    if spec.startswith("adb:") and spec[4:].strip():
        return spec[4:].strip()
    raise CareQError(f"unknown device '{spec}'; use adb or adb:SERIAL (see `adb devices`)")


def adb(serial: str | None, *args: str) -> list[str]:
    return ["adb", *(["-s", serial] if serial else []), *args]


def _remote_name(name: str, path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return f"{stem}{path.suffix.lower()}"


def push_commands(artifacts: dict[str, Path], binary: Path, serial: str | None,
                  device_dir: str = DEVICE_DIR) -> list[list[str]]:
    """mkdir, push + chmod the binary, push each artifact."""
    remote_bin = f"{device_dir}/benchmark_model"
    cmds = [adb(serial, "shell", "mkdir", "-p", device_dir),
            adb(serial, "push", str(binary), remote_bin),
            adb(serial, "shell", "chmod", "755", remote_bin)]
    for name, path in artifacts.items():
        cmds.append(adb(serial, "push", str(path), f"{device_dir}/{_remote_name(name, path)}"))
    return cmds


def benchmark_command(remote_model: str, serial: str | None, delegate: str, threads: int, runs: int,
                      warmup_runs: int, device_dir: str = DEVICE_DIR) -> list[str]:
    """``adb shell`` line running benchmark_model on one pushed model."""
    if delegate not in DELEGATES:
        raise CareQError(f"unknown delegate '{delegate}'; choose from {', '.join(DELEGATES)}")
    args = [f"{device_dir}/benchmark_model", f"--graph={remote_model}", f"--num_threads={threads}",
            f"--num_runs={runs}", f"--warmup_runs={warmup_runs}", "--min_secs=0", "--warmup_min_secs=0",
            "--report_peak_memory_footprint=true", *_DELEGATE_FLAGS[delegate]]
    # adb shell joins its arguments into one device shell command line: quote each
    return adb(serial, "shell", " ".join(shlex.quote(a) for a in args))


# ----------------------------------------------------------------------------- running
def _run(runner, cmd: list[str], timeout: float) -> str:
    try:
        r = runner(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise CareQError("adb not found on PATH; install Android platform-tools") from None
    except subprocess.TimeoutExpired:
        raise CareQError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    text = (r.stdout or "") + (("\n" + r.stderr) if r.stderr else "")
    if r.returncode != 0:
        tail = " | ".join(ln.strip() for ln in text.strip().splitlines()[-4:])
        raise CareQError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {tail[:400] or 'no output'}")
    return text


def _normalize(artifacts) -> dict[str, Path]:
    if isinstance(artifacts, dict):
        items = [(str(k), Path(v)) for k, v in artifacts.items()]
    else:
        items = [(Path(p).stem, Path(p)) for p in artifacts]
    if not items:
        raise CareQError("no artifact to benchmark")
    names = [k for k, _ in items]
    if len(set(names)) != len(names):
        raise CareQError(f"artifact names must be distinct, got {names}")
    for name, p in items:
        if p.suffix.lower() != ".tflite":
            raise CareQError(f"{p}: benchmark_model runs .tflite files only")
        if not p.is_file():
            raise CareQError(f"model file not found: {p} (artifact '{name}')")
    return dict(items)


def run_device_bench(artifacts, serial: str | None, binary: str | Path, delegate: str = "xnnpack",
                     threads: int = 4, runs: int = 50, runner=subprocess.run, rounds: int = 3,
                     warmup_runs: int = 5, device_dir: str = DEVICE_DIR, timeout_s: float = 600.0) -> dict:
    """Push `artifacts` ({name: path} or a list of paths) and `binary`, run them interleaved, parse.

    Returns ``{"device", "delegate", "threads", "runs", "rounds", "commands", "results"}`` where
    ``results[name]`` has ``avg_ms``, ``std_ms``, ``min_ms``, ``max_ms``, ``median_round_avg_ms``,
    ``count``, ``init_ms``, ``first_inference_ms``, ``warmup_avg_ms``, ``memory`` (max over rounds),
    ``delegate`` and ``per_round`` (each round's parsed output), plus ``ratio_to_first`` (this
    artifact's avg over the first artifact's).
    """
    arts = _normalize(artifacts)
    binary = Path(binary)
    if not binary.is_file():
        raise CareQError(f"benchmark binary not found: {binary} (build or download TFLite's benchmark_model "
                         f"for the device's ABI)")
    if delegate not in DELEGATES:
        raise CareQError(f"unknown delegate '{delegate}'; choose from {', '.join(DELEGATES)}")
    for what, v in (("threads", threads), ("runs", runs), ("rounds", rounds)):
        if v < 1:
            raise CareQError(f"{what} must be >= 1, got {v}")
    if warmup_runs < 0:
        raise CareQError(f"warmup_runs must be >= 0, got {warmup_runs}")
    rounds = min(rounds, runs)
    per_round = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    commands: list[list[str]] = []
    for cmd in push_commands(arts, binary, serial, device_dir):
        _run(runner, cmd, timeout_s)
        commands.append(cmd)
    parsed: dict[str, list[dict]] = {name: [] for name in arts}
    for k in per_round:
        for name, path in arts.items():
            cmd = benchmark_command(f"{device_dir}/{_remote_name(name, path)}", serial, delegate, threads, k,
                                    warmup_runs, device_dir)
            out = _run(runner, cmd, timeout_s)
            commands.append(cmd)
            parsed[name].append(parse_benchmark_output(out))
    results = {name: _aggregate(rs) for name, rs in parsed.items()}
    first = next(iter(results.values()))["avg_ms"]
    for r in results.values():
        r["ratio_to_first"] = r["avg_ms"] / first if first else None
    return {"device": serial or "adb (default device)", "delegate": delegate, "threads": threads, "runs": runs,
            "rounds": rounds, "binary": str(binary), "device_dir": device_dir, "commands": commands,
            "results": results}


def _aggregate(rounds: list[dict]) -> dict:
    """Combine rounds: count-weighted mean, pooled std, min/max, median of round means."""
    stats = []
    for r in rounds:
        s = r.get("runs") or {}
        n = int(s.get("count", 0))
        avg = s.get("avg", r["inference_avg_us"])
        std = s.get("std", 0.0)
        stats.append((n if n else 1, avg, std, s.get("min", avg), s.get("max", avg)))
    total = sum(n for n, *_ in stats)
    mean = sum(n * a for n, a, *_ in stats) / total
    var = sum(n * (sd * sd + (a - mean) ** 2) for n, a, sd, *_ in stats) / total
    mems = [r["memory"] for r in rounds]

    def _max(key):
        vals = [m[key] for m in mems if m.get(key) is not None]
        return max(vals) if vals else None

    return {"avg_ms": mean / 1e3, "std_ms": math.sqrt(var) / 1e3,
            "min_ms": min(s[3] for s in stats) / 1e3, "max_ms": max(s[4] for s in stats) / 1e3,
            "median_round_avg_ms": statistics.median(a for _, a, *_ in stats) / 1e3, "count": total,
            "init_ms": statistics.median(r["init_us"] for r in rounds) / 1e3,
            "first_inference_ms": statistics.median(r["first_inference_us"] for r in rounds) / 1e3,
            "warmup_avg_ms": statistics.median(r["warmup_avg_us"] for r in rounds) / 1e3,
            "memory": {"init_mb": _max("init_mb"), "overall_mb": _max("overall_mb"), "peak_mb": _max("peak_mb")},
            "delegate": rounds[-1]["delegate"], "per_round": rounds}
