"""Ethos-U targets: compile a .tflite with Arm's Vela and read back what the compiler decided.

Unlike the rule-based targets (XNNPACK, NNAPI, Edge TPU), nothing here is predicted: Vela (the
``ethos-u-vela`` package) compiles the file for one accelerator config (``ethos-u55-128``,
``ethos-u85-256``, ... as Vela lists them) and care-q reads its own outputs:

- the summary CSV (``<model>_summary_<system config>.csv``): SRAM / DRAM / flash use, the
  estimated inference time and cycles, the system config and memory mode Vela assumed;
- the debug database (``--enable-debug-db``, ``<model>_debug.xml``): its ``source`` table maps
  Vela's source ops to the input's op indices (``ext_key``), ``optimised`` says what each became
  (``Passthrough``: left to the CPU) and ``queue`` which command stream (NPU segment) runs it;
- the compiled ``<model>_vela.tflite``: one ``ethos-u`` custom op per NPU segment, the CPU ops
  between them, in execution order;
- Vela's log, only for the reasons: ``Warning (supported operators) operator: OP, ofm: 'NAME'``
  followed by ``Reason: ...`` (Vela writes them nowhere else).

    out = run_vela("m.tflite", "ethos-u85-256")        # VelaOutput: the files above, read
    res = compiled_result(read_tflite("m.tflite"), out)  # a TargetResult with source="compiled"

Vela runs in a subprocess in a temporary directory: its compiler core is native code, and a
corrupt .tflite crashed Vela 5.2.0 with SIGSEGV here (care-q reports that as a one-line error).
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from care_q.census.partitions import Segment
from care_q.census.report import TargetResult
from care_q.census.tflite_reader import TFLiteGraph, read_tflite
from care_q.census.verdict import Verdict
from care_q.errors import CareQError

PREFIX = "ethos-u"
NPU_OP = "CUSTOM:ethos-u"
_QUANTIZED = ("INT8", "UINT8", "INT16")
_WARNING = re.compile(r"^Warning \(supported operators\) operator: (\S+), ofm: '(.*)'$")
_TABLE = re.compile(r'<table name="(\w+)">\s*<!\[CDATA\[\n(.*?)\]\]>', re.S)
_MEMORIES = (("sram_memory_used", "SRAM"), ("dram_memory_used", "DRAM"),
             ("on_chip_flash_memory_used", "On-chip Flash"), ("off_chip_flash_memory_used", "Off-chip Flash"))


def is_vela_target(name: str) -> bool:
    return name.strip().lower().startswith(PREFIX)


def vela_version() -> str:
    try:
        return metadata.version("ethos-u-vela")
    except metadata.PackageNotFoundError:
        raise CareQError("Ethos-U targets need Arm's Vela compiler: pip install ethos-u-vela==5.2.0") from None


def accelerator_configs() -> tuple[str, ...]:
    """The accelerator configs Vela accepts, from Vela itself."""
    vela_version()
    from ethosu.vela.architecture_features import Accelerator

    return tuple(Accelerator.member_list())


def check_config(name: str) -> str:
    """``name`` normalised, or a CareQError listing the configs Vela accepts."""
    configs = accelerator_configs()
    got = name.strip().lower()
    if got not in configs:
        raise CareQError(f"unknown Ethos-U accelerator config '{name.strip()}'; Vela {vela_version()} accepts "
                         f"{', '.join(configs)}")
    return got


@dataclass
class VelaOutput:
    """What one Vela run wrote, read into memory (also what tests/recorded/vela_* holds)."""

    config: str                                  # the accelerator config compiled for
    log: str                                     # Vela's stdout and stderr
    summary: dict[str, str]                      # the summary CSV's row
    tables: dict[str, list[dict[str, str]]]      # debug database tables by name
    compiled: TFLiteGraph                        # <model>_vela.tflite
    version: str = ""                            # Vela's version

    @classmethod
    def read(cls, out_dir: str | Path, config: str, log: str, version: str) -> VelaOutput:
        out_dir = Path(out_dir)
        summaries = sorted(out_dir.glob("*_summary_*.csv"))
        compiled = sorted(out_dir.glob("*_vela.tflite"))
        debug = sorted(out_dir.glob("*_debug.xml"))
        if not (summaries and compiled and debug):
            raise CareQError(f"Vela failed for {config}: {_last_message(log)}")
        rows = list(csv.DictReader(io.StringIO(summaries[0].read_text())))
        if not rows:
            raise CareQError(f"Vela failed for {config}: empty summary {summaries[0].name}")
        tables = {name: list(csv.DictReader(io.StringIO(body)))
                  for name, body in _TABLE.findall(debug[0].read_text())}
        for need in ("source", "optimised", "queue"):
            if need not in tables:
                raise CareQError(f"Vela's debug database {debug[0].name} has no '{need}' table")
        return cls(config, log, rows[0], tables, read_tflite(compiled[0]), version)


def run_vela(path: str | Path, config: str, timeout: float = 900) -> VelaOutput:
    """Compile ``path`` for accelerator ``config`` in a temporary directory and read the outputs."""
    path = Path(path)
    config = check_config(config)
    with tempfile.TemporaryDirectory(prefix="care_q_vela_") as tmp:
        cmd = [sys.executable, "-m", "ethosu.vela", str(path.resolve()), "--accelerator-config", config,
               "--output-dir", tmp, "--enable-debug-db"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise CareQError(f"{path}: Vela did not finish compiling for {config} in {timeout:.0f} s") from None
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            how = f"exit {proc.returncode}" if proc.returncode > 0 else f"crashed, signal {-proc.returncode}"
            raise CareQError(f"{path}: Vela failed for {config} ({how}): {_last_message(log)}")
        try:
            return VelaOutput.read(tmp, config, log, vela_version())
        except CareQError as e:
            raise CareQError(f"{path}: {e}") from None


def _last_message(log: str) -> str:
    """Vela's error in one line: the last line of its output that is not a default-config warning."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not ln.startswith("Warning: No ")]
    return lines[-1][:300] if lines else "no output"


def require_int8(graph: TFLiteGraph) -> None:
    """A float model compiles to all-CPU: refuse it instead of reporting a trivial result."""
    acts = {graph.tensors[t].dtype for op in graph.ops for t in op.inputs + op.outputs
            if t >= 0 and not graph.tensors[t].constant}
    if not acts & set(_QUANTIZED):
        raise CareQError(f"{graph.path}: not an int8 model (activations are {', '.join(sorted(acts)) or 'none'}); "
                         f"Vela would leave every op on the CPU: quantize it first (care-q ptq)")


def vela_result(path: str | Path, graph: TFLiteGraph, config: str) -> TargetResult:
    """Compile ``path`` (already read as ``graph``) for ``config`` and return its TargetResult."""
    require_int8(graph)
    return compiled_result(graph, run_vela(path, config))


# ------------------------------------------------------------------------------ parsing
def parse_reasons(log: str) -> dict[tuple[str, str], list[str]]:
    """(op type, ofm name) -> Vela's reasons for leaving it on the CPU, from its log (the ``Reason:``
    line of each warning; the generic constraint text after it is left out)."""
    out: dict[tuple[str, str], list[str]] = {}
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = _WARNING.match(line.strip())
        if not m:
            continue
        body = []
        for nxt in lines[i + 1:]:
            if not nxt.strip() or _WARNING.match(nxt.strip()):
                break
            body.append(nxt.strip())
        reason = body[0].removeprefix("Reason: ") if body else "no reason given"
        out.setdefault((m.group(1), m.group(2)), []).append(reason)
    return out


def compiled_result(graph: TFLiteGraph, out: VelaOutput) -> TargetResult:
    """The TargetResult of one Vela run on ``graph``: per-op placement and reason, NPU segments in
    execution order, memory use and the estimated time."""
    try:
        return _compiled_result(graph, out)
    except (KeyError, ValueError, IndexError) as e:
        raise CareQError(f"{graph.path}: Vela {out.version}'s outputs for {out.config} are not in the format care-q "
                         f"reads ({type(e).__name__}: {e}); care-q reads ethos-u-vela 5.2.0's") from None


def _compiled_result(graph: TFLiteGraph, out: VelaOutput) -> TargetResult:
    n = len(graph.ops)
    ext = {r["id"]: int(r["ext_key"]) for r in out.tables["source"]}
    kinds: dict[int, list[str]] = {}
    opt_src: dict[str, int] = {}
    for r in out.tables["optimised"]:
        i = ext.get(r["source_id"])
        if i is None or not 0 <= i < n:
            continue
        opt_src[r["id"]] = i
        if r["operator"] not in kinds.setdefault(i, []):
            kinds[i].append(r["operator"])
    cpu = {i for i, k in kinds.items() if "Passthrough" in k}
    cpu_compiled = [op for op in out.compiled.ops if op.name != NPU_OP]
    if len(cpu_compiled) != len(cpu):
        raise CareQError(f"{graph.path}: cannot reconcile Vela's outputs for {out.config}: the compiled model has "
                         f"{len(cpu_compiled)} CPU ops, the debug database {len(cpu)}")
    reasons = parse_reasons(out.log)
    verdicts: dict[int, Verdict] = {}
    for op in graph.ops:
        ofm = graph.tensors[op.outputs[0]].name if op.outputs else ""
        if op.index in cpu:
            why = reasons.get((op.name, ofm)) or ["Vela gave no reason"]
            verdicts[op.index] = Verdict(False, "; ".join(why))
        elif op.index in kinds:
            verdicts[op.index] = Verdict(True, "NPU: " + ", ".join(kinds[op.index]))
        else:
            verdicts[op.index] = Verdict(True, "NPU: removed by Vela's graph optimiser")
    segments = _segments(graph, out, opt_src, cpu)
    on_npu = {i for i in range(n) if i not in cpu}
    return TargetResult(out.config, verdicts, on_npu, segments, graph.total_macs, source="compiled",
                        compiled=_metrics(out))


def _segments(graph: TFLiteGraph, out: VelaOutput, opt_src: dict[str, int], cpu: set[int]) -> list[Segment]:
    """NPU segments (one per ethos-u custom op, with the ops its command stream runs) and the CPU
    ops between them, in the compiled model's execution order; every op in exactly one segment."""
    streams: dict[str, list[int]] = {}
    for r in out.tables["queue"]:
        i = opt_src.get(r["optimised_id"])
        if i is not None and i not in cpu:
            streams.setdefault(r["cmdstream_id"], [])
            if i not in streams[r["cmdstream_id"]]:
                streams[r["cmdstream_id"]].append(i)
    stream_ops = [streams[k] for k in sorted(streams, key=int)]
    order = _stream_order(graph, out, stream_ops)
    by_output = {}
    for i in sorted(cpu):
        op = graph.ops[i]
        by_output.setdefault((op.name, tuple(graph.tensors[t].name for t in op.outputs)), []).append(i)
    placed: dict[int, int] = {}
    segments: list[Segment] = []
    k = 0
    for cop in out.compiled.ops:
        if cop.name == NPU_OP:
            nodes = [i for i in (stream_ops[order[k]] if order[k] is not None else []) if i not in placed]
            k += 1
            segments.append(Segment(True, nodes))
        else:
            key = (cop.name, tuple(out.compiled.tensors[t].name for t in cop.outputs))
            cands = [i for i in by_output.get(key, []) if i not in placed]
            if not segments or segments[-1].delegated:
                segments.append(Segment(False, []))
            if cands:
                segments[-1].nodes.append(cands[0])
        for i in segments[-1].nodes:
            placed[i] = len(segments) - 1
    _place_rest(graph, segments, placed, cpu)
    for s in segments:
        s.macs = sum(graph.ops[i].macs for i in s.nodes)
    return segments


def _stream_order(graph: TFLiteGraph, out: VelaOutput, stream_ops: list[list[int]]) -> list[int | None]:
    """For each ethos-u custom op of the compiled model, in order, the command stream it runs: the
    stream holding the op that produces the custom op's first output (by tensor name), else the
    streams in the order of their ids."""
    producers = graph.producers()
    producer_of = {graph.tensors[t].name: i for t, i in producers.items()}
    customs = [op for op in out.compiled.ops if op.name == NPU_OP]
    order: list[int | None] = []
    for k, cop in enumerate(customs):
        name = out.compiled.tensors[cop.outputs[0]].name if cop.outputs else None
        src = producer_of.get(name)
        hit = next((j for j, ops in enumerate(stream_ops) if src in ops), None)
        order.append(hit if hit is not None else (k if k < len(stream_ops) else None))
    return order


def _place_rest(graph: TFLiteGraph, segments: list[Segment], placed: dict[int, int], cpu: set[int]) -> None:
    """Ops with no NPU command of their own (reshapes Vela removed, ops fused into a neighbour)
    join the NPU segment of their producer, else of a consumer; CPU ops not matched by name join
    the first CPU segment."""
    producers, consumers = graph.producers(), graph.consumers()
    first_npu = next((j for j, s in enumerate(segments) if s.delegated), None)
    first_cpu = next((j for j, s in enumerate(segments) if not s.delegated), None)
    for op in graph.ops:
        if op.index in placed:
            continue
        if op.index in cpu:
            home = first_cpu
        else:
            near = [producers[t] for t in op.inputs if t in producers]
            near += [c for t in op.outputs for c in consumers.get(t, [])]
            home = next((placed[j] for j in near if j in placed and segments[placed[j]].delegated), first_npu)
        if home is None:
            segments.append(Segment(op.index not in cpu, []))
            home = len(segments) - 1
        segments[home].nodes.append(op.index)
        placed[op.index] = home


def _metrics(out: VelaOutput) -> dict:
    """Vela's summary: the configuration it assumed, memory use (KiB) and the estimated time."""
    s = out.summary

    def num(key: str) -> float:
        try:
            return float(s.get(key, "nan"))
        except ValueError:
            return float("nan")

    memory = {label: num(key) for key, label in _MEMORIES if num(key) > 0}
    return {"compiler": f"Vela {out.version}".strip(), "accelerator": out.config,
            "system_config": s.get("system_config", ""), "memory_mode": s.get("memory_mode", ""),
            "clock_hz": num("core_clock"), "memory_kib": memory,
            "weights_area": s.get("weights_storage_area", ""),
            "feature_map_area": s.get("feature_map_storage_area", ""),
            "inference_time_s": num("inference_time"), "cycles_total": int(num("cycles_total")),
            "cycles_npu": int(num("cycles_npu")), "nn_macs": int(num("nn_macs")),
            "npu_segments": sum(1 for op in out.compiled.ops if op.name == NPU_OP)}
