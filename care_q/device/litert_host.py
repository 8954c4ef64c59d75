"""Host latency through LiteRT's CompiledModel API, with the benchmark ai-edge-litert ships.

ai-edge-litert 2.x includes ``ai_edge_litert.tools.benchmark_litert_model`` (the Python mirror of
LiteRT's C++ ``benchmark_litert_model``: CPU, GPU or NPU accelerators through ``CompiledModel``,
where ``care_q.runtime`` uses the classic ``Interpreter``). Each artifact runs in its own process,
interleaved by rounds as on the device, and the tool's ``--result_json`` is read back.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from care_q.device.adb import _normalize
from care_q.errors import CareQError

TOOL = "ai_edge_litert.tools.benchmark_litert_model"
ACCELERATORS = ("cpu", "gpu", "npu")


def host_command(model: Path, result_json: Path, threads: int, runs: int, warmup_runs: int,
                 accelerator: str = "cpu", python: str = sys.executable) -> list[str]:
    if accelerator not in ACCELERATORS:
        raise CareQError(f"unknown accelerator '{accelerator}'; choose from {', '.join(ACCELERATORS)}")
    cmd = [python, "-m", TOOL, f"--model={model}", f"--num_runs={runs}", f"--warmup_runs={warmup_runs}",
           f"--num_threads={threads}", f"--result_json={result_json}"]
    if accelerator != "cpu":
        cmd.append(f"--use_{accelerator}")
    return cmd


def run_host_litert_bench(artifacts, threads: int = 1, runs: int = 20, rounds: int = 2, warmup_runs: int = 3,
                          accelerator: str = "cpu", runner=subprocess.run, timeout_s: float = 600.0) -> dict:
    """``{"results": {name: {avg_ms, median_round_median_ms, min_ms, max_ms, std_ms, init_ms, count,
    per_round}}}``: count-weighted mean and pooled std over the rounds."""
    arts = _normalize(artifacts)
    if min(threads, runs, rounds) < 1:
        raise CareQError(f"threads, runs and rounds must be >= 1, got {threads}, {runs}, {rounds}")
    rounds = min(rounds, runs)
    per_round = [runs // rounds + (1 if i < runs % rounds else 0) for i in range(rounds)]
    parsed: dict[str, list[dict]] = {n: [] for n in arts}
    commands = []
    with tempfile.TemporaryDirectory(prefix="care_q_litert_") as d:
        for i, k in enumerate(per_round):
            for name, path in arts.items():
                out = Path(d) / f"{name}_{i}.json"
                cmd = host_command(path, out, threads, k, warmup_runs, accelerator)
                commands.append(cmd)
                r = runner(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
                if r.returncode != 0 or not out.exists():
                    tail = " | ".join(((r.stdout or "") + (r.stderr or "")).strip().splitlines()[-3:])
                    raise CareQError(f"{TOOL} failed on {path} (exit {r.returncode}): {tail[:400]}")
                parsed[name].append(json.loads(out.read_text())["latency"])
    results = {}
    for name, rs in parsed.items():
        n = sum(r["num_runs"] for r in rs)
        avg = sum(r["avg_ms"] * r["num_runs"] for r in rs) / n
        var = sum(r["num_runs"] * (r["std_ms"] ** 2 + (r["avg_ms"] - avg) ** 2) for r in rs) / n
        results[name] = {"avg_ms": avg, "median_round_median_ms": statistics.median(r["median_ms"] for r in rs),
                         "min_ms": min(r["min_ms"] for r in rs), "max_ms": max(r["max_ms"] for r in rs),
                         "std_ms": math.sqrt(var), "init_ms": statistics.median(r["init_ms"] for r in rs),
                         "count": n, "per_round": rs}
    return {"tool": TOOL, "accelerator": accelerator, "threads": threads, "runs": runs, "rounds": rounds,
            "commands": commands, "results": results}
