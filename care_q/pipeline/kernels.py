"""Per-op kernel choice for the .tflite (recipe ``tflite.kernels: measured``): int8, or a float island.

    section = choose_kernels(plan, threads=2)              # sets plan.float_kernels
    section = choose_kernels(plan, profile="phone.json")   # a profile measured on the target device

The candidates are the plan's elementwise ops whose inputs and output are int8 and that the
exporter can write as float islands (`care_q.export.tflite_int8.FLOAT_KERNEL_OPS`). Each is timed
as a one-op model in both forms (`care_q.export.tflite_profile`), on this machine or from a profile
measured elsewhere (`care-q bench --kernel-profile`), and runs as a float island where that takes
at most `MARGIN` of the int8 op's time. Islands keep every tensor's int8 parameters, so the choice
costs no fidelity: the float op computes on the same grids (the TFLite reference computes it in
float too); in practice it removes error where TFLite's int8 kernel approximates (DIV's fixed-point
reciprocal).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from care_q.export.tflite_int8 import FLOAT_KERNEL_OPS, emit_tflite_int8
from care_q.export.tflite_profile import choose_float_kernels, load_profile, measure, save_profile
from care_q.quant.plan import QuantPlan

MARGIN = 0.9  # an island must save at least 10% of the op's time (one-op timings vary by a few %)
# One-op timings in this many blocks (processes), an island only where all agree. Measured (2026-12-08, this 2-core
# host, 2 threads): 9 blocks of care_s0's ptq_int8 file at 224, its 130 candidates (22 signatures): two single
# blocks chose differently on 0-3 signatures (up to 32 ops), two sets of 3 unanimous blocks on 0-1 (4 ops); the
# islands saved 2.38-2.42 ms of one-op time either way (the ops that flip are near ties).
BLOCKS = 3


def candidates(plan: QuantPlan) -> dict[str, str]:
    """node name -> op of the nodes that may run as float islands."""
    return {n.name: n.op for n in plan.graph.nodes
            if n.op in FLOAT_KERNEL_OPS and all(plan.quantized(t) for t in [*n.inputs, *n.outputs])}


def choose_kernels(plan: QuantPlan, io: str = "float", *, threads: int = 2, runs: int = 20, blocks: int = BLOCKS,
                   profile: str | Path | None = None, save_to: str | Path | None = None) -> dict:
    """Set ``plan.float_kernels`` from one-op timings (measured here in ``blocks`` blocks, or read from
    ``profile``); returns the report's section. An op runs as an island where every block finds it
    within the margin; ops whose blocks disagree stay int8 and are listed ("close", with the time the
    islands would save there). Timings still vary from run to run: a measured profile is written to
    ``save_to``, and passing it back as ``profile`` reproduces the same file."""
    cand = candidates(plan)
    plan.float_kernels = frozenset()
    data = emit_tflite_int8(plan, io=io)
    if profile is not None:
        prof = load_profile(profile)
    else:
        prof = measure(data, threads, runs, only=set(cand), blocks=blocks)
        if save_to is not None:
            save_profile(prof, save_to)
    choice = choose_float_kernels(data, prof, set(cand), MARGIN)
    plan.float_kernels = frozenset(choice["float"])
    by_op = Counter(cand[n] for n in choice["float"])
    return {"source": str(profile) if profile is not None else f"measured on this machine ({threads} threads)",
            "profile": None if profile is None and save_to is None else str(profile if profile is not None else save_to),
            "device": prof.get("device", "host"), "margin": MARGIN, "candidates": len(cand),
            "blocks": prof.get("blocks", 1), "float": choice["float"], "float_by_op": dict(by_op),
            "close": choice["close"], "close_ms": round(choice["close_ms"], 4),
            "int8_by_op": dict(Counter(cand.values()) - by_op),
            "one_op_ms": {"int8": round(sum(r["int8_ms"] for r in choice["rows"]), 3),
                          "chosen": round(sum(min(r["int8_ms"], r["float_ms"]) if r["output"] in plan.float_kernels
                                              else r["int8_ms"] for r in choice["rows"]), 3)}}
