"""`care-q bench --kernel-profile`: one-op timings of an int8 .tflite, here or on a phone, as a file
that `care-q ptq --recipe ptq_int8_cpu --kernel-profile` chooses kernels from; with the bound.

    summary = kernel_profile("out/care_s0_int8.tflite", "phone.json", device="adb", binary="benchmark_model")
    summary["bound_ms"], summary["groups"]

The profile (`care_q.export.tflite_profile`) holds every distinct op of the file in both forms (int8,
float island). Profile the file of the model and input size you will deploy (a `ptq_int8` .tflite):
the signatures are op kinds, options and tensor shapes, so ptq_int8_cpu's ops find theirs.
"""

from __future__ import annotations

from pathlib import Path

from care_q.errors import CareQError
from care_q.export.tflite_profile import measure, measure_on_device, save_profile, summarize


def kernel_profile(artifact: str | Path, out: str | Path, *, threads: int = 2, runs: int = 20,
                   device: str | None = None, binary: str | Path | None = None, runner=None) -> dict:
    """Profile ``artifact`` (an int8 .tflite), write the profile to ``out``; returns the per-kind summary."""
    path = Path(artifact)
    if path.is_dir() or path.suffix.lower() != ".tflite":
        raise CareQError(f"--kernel-profile times one int8 .tflite file; got '{path}'")
    if not path.is_file():
        raise CareQError(f"model file not found: {path}")
    if device is not None and binary is None:
        raise CareQError("--device needs --benchmark-binary: TFLite's benchmark_model built for the device's ABI")
    data = path.read_bytes()
    if device is None:
        prof = measure(data, threads, runs)
    else:
        prof = measure_on_device(data, device, binary, threads, runs, runner=runner)
    prof["artifact"] = path.name
    s = summarize(data, prof)
    if not any(r["float_ms"] is not None for r in s["rows"]):
        raise CareQError(f"{path.name} has no int8 op: a kernel profile is measured on an int8 file (ptq_int8)")
    save_profile(prof, out)
    return {"profile": str(out), "device": prof["device"], "threads": threads, "ops": len(s["rows"]),
            "distinct": len(prof["ops"]), "ms": s["ms"], "bound_ms": s["bound_ms"], "groups": s["groups"]}
