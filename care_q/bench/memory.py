"""Peak memory of one artifact in its runtime, measured in a child process.

    probe("out/care_s0_int8.tflite", delegate="xnnpack", threads=2)
    -> {"baseline_mb", "peak_mb", "delta_mb", "ok": True}   or   {"ok": False, "failure": {...}}

The child (a fresh interpreter that runs this file as a script, without importing care_q or
torch) imports both runtimes, reads its resident set (VmRSS), loads the artifact in its runtime
directly (onnxruntime with the session config `care_q.runtime.file_session_config` gives the
artifact on this CPU, or the TFLite interpreter with the
delegate asked for), runs a few inferences on a seeded input, then reads its high-water mark (VmHWM; `resource.getrusage` where
/proc is missing). ``delta_mb`` = peak - baseline: what loading and running the model costs.
Because it runs the model, the probe doubles as a crash check: an artifact whose runtime aborts
is reported (signal name) instead of taking the benchmark process down.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def bench_input(shape, seed: int = 0) -> np.ndarray:
    """The seeded standard-normal input every latency measurement uses (batch 1 unless fixed)."""
    n, c, h, w = [d if d else 1 for d in shape]
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)


def _child(path: str, delegate: str, threads: int, runs: int, session_config: dict) -> dict:
    """Runs in a fresh interpreter that does not import care_q (no torch in the baseline)."""
    import ai_edge_litert.interpreter as tfl  # imported before the baseline: not the model's cost
    import onnxruntime as ort

    base = _status_mb("VmRSS")
    if path.endswith(".onnx"):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for k, v in session_config.items():
            so.add_session_config_entry(str(k), str(v))
        sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        dtype = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}[inp.type]
        feed = {inp.name: _input(shape, dtype)}
        for _ in range(runs):
            sess.run(None, feed)
    else:
        kw = {"num_threads": threads}
        if delegate == "builtin":
            kw["experimental_op_resolver_type"] = tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        elif delegate == "reference":
            kw["experimental_op_resolver_type"] = tfl.OpResolverType.BUILTIN_REF
        it = tfl.Interpreter(model_path=path, **kw)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        it.set_tensor(d["index"], _input([int(v) for v in d["shape"]], d["dtype"]))
        for _ in range(runs):
            it.invoke()
    peak = _status_mb("VmHWM")
    if peak is None or base is None:  # no /proc: ru_maxrss (KiB on Linux) and no baseline
        peak, base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 0.0
    return {"ok": True, "baseline_mb": round(base, 1), "peak_mb": round(peak, 1), "delta_mb": round(peak - base, 1)}


def _input(shape, dtype) -> np.ndarray:
    """The seeded bench input: standard normal (NCHW or NHWC alike), integers for integer inputs."""
    rng = np.random.default_rng(0)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def probe(path, delegate: str = "xnnpack", threads: int = 2, runs: int = 3, timeout: float = 600) -> dict:
    """Peak memory of ``path`` (see the module docstring); never raises for a crashing runtime."""
    # run as a script, not ``-m care_q...``: importing the care_q package would import torch
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), str(Path(path).resolve()), delegate, str(threads),
           str(runs)]
    if str(path).lower().endswith(".onnx"):  # the session entries the runner applies on this CPU
        from care_q.errors import CareQError
        from care_q.runtime import file_session_config, onnx_metadata

        try:
            entries = file_session_config(onnx_metadata(Path(path)), Path(path))
        except CareQError:  # an unreadable file: the child's session reports it
            entries = {}
        cmd.append(json.dumps(entries))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "failure": {"type": "timeout", "message": f"no result after {timeout:.0f} s"}}
    if p.returncode == 0:
        for line in reversed(p.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
    if p.returncode < 0:
        try:
            sig = signal.Signals(-p.returncode).name
        except ValueError:
            sig = f"signal {-p.returncode}"
        return {"ok": False, "failure": {"type": "abort", "signal": sig,
                                         "message": f"the runtime process died with {sig}"
                                                    + (f": {lines[-1][:300]}" if lines else "")}}
    msg = next((ln[len("ERROR "):] for ln in reversed(lines) if ln.startswith("ERROR ")), lines[-1] if lines else "")
    return {"ok": False, "failure": {"type": "error", "exit_code": p.returncode, "message": msg[:400]}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, delegate, threads, runs = argv[0], argv[1], int(argv[2]), int(argv[3])
    try:
        res = _child(path, delegate, threads, runs, json.loads(argv[4]) if len(argv) > 4 else {})
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"ERROR {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
