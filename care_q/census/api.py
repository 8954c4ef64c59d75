"""`check(path, targets)`: the compatibility census of one .tflite or .onnx artifact."""

from __future__ import annotations

from pathlib import Path

from care_q.census.groundtruth import xnnpack_partitions
from care_q.census.onnx_fusion import onnx_fusion
from care_q.census.partitions import Segment, edgetpu_cut, limit_partitions, partition
from care_q.census.report import CensusReport, OpInfo, TargetResult
from care_q.census.rules_edgetpu import EdgeTpuRules
from care_q.census.rules_nnapi import DEFAULT_FL, FL_TO_SDK, MAX_PARTITIONS, NnapiRules
from care_q.census.rules_xnnpack import XnnpackRules
from care_q.census.tflite_reader import TFLiteGraph, read_tflite
from care_q.census.vela import check_config, is_vela_target, vela_result
from care_q.errors import CareQError

TARGETS = ("xnnpack", "nnapi", "edgetpu")          # rule-based; "all" is these three
_CHOOSE = f"choose from {', '.join(TARGETS)}, nnapi:FL<1-8>, all or an Ethos-U config for Vela (e.g. ethos-u55-128)"


def parse_targets(targets) -> list[tuple[str, int | None]]:
    """'xnnpack' | 'nnapi' | 'nnapi:6' | 'nnapi:FL6' | 'edgetpu' | 'all' | a Vela accelerator config
    ('ethos-u55-128', 'ethos-u85-256', ...; compiled, not rule-based) (or a sequence of them)
    -> [(name, feature_level or None)], in the given order, duplicates dropped."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t.strip()]
    out: list[tuple[str, int | None]] = []
    for raw in targets:
        t = str(raw).strip().lower()
        if t == "all":
            items = [("xnnpack", None), ("nnapi", DEFAULT_FL), ("edgetpu", None)]
        elif t.startswith("nnapi"):
            fl = DEFAULT_FL
            if ":" in t:
                level = t.split(":", 1)[1].removeprefix("fl")
                if not level.isdigit() or int(level) not in FL_TO_SDK:
                    raise CareQError(f"unknown NNAPI feature level '{str(raw).strip().split(':', 1)[1]}' in target '{raw}'; "
                                     f"choose 1..8 (e.g. nnapi:6 or nnapi:FL6)")
                fl = int(level)
            elif t != "nnapi":
                raise CareQError(f"unknown target '{raw}'; {_CHOOSE}")
            items = [("nnapi", fl)]
        elif t in ("xnnpack", "edgetpu"):
            items = [(t, None)]
        elif is_vela_target(t):
            items = [(check_config(t), None)]
        else:
            raise CareQError(f"unknown target '{raw}'; {_CHOOSE}")
        for it in items:
            if it not in out:
                out.append(it)
    if not out:
        raise CareQError(f"no target given; {_CHOOSE}")
    return out


def check(path: str | Path, targets=TARGETS, runtime: bool = True) -> CensusReport:
    """Census of one artifact.

    .tflite: for each target, every op's verdict and rule, the partitions, the share of MACs on
    the accelerator and, for the Edge TPU, the first unmapped op. With ``runtime`` (default) the
    XNNPACK verdict is checked against what ai-edge-litert delegates on the same file. An Ethos-U
    target (``ethos-u55-128``, ...) is compiled by Vela: its verdicts are the compiler's, with its
    memory use and estimated time (``TargetResult.source == "compiled"``).
    .onnx: which QDQ groups onnxruntime's CPU EP fuses into integer kernels (rule targets ignored;
    an Ethos-U target is an error: Vela compiles .tflite only).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        vela = [t for t in ([targets] if isinstance(targets, str) else targets)
                for t in str(t).split(",") if is_vela_target(t)]
        if vela:
            raise CareQError(f"{path}: {vela[0].strip()} is a Vela target and Vela compiles .tflite files only; "
                             f"check the .tflite artifact")

        return CensusReport(path, "onnx", onnx=onnx_fusion(path))
    if suffix != ".tflite":
        raise CareQError(f"{path}: care-q check reads .tflite and .onnx artifacts, not '{suffix or path.name}'")
    wanted = parse_targets(targets)
    graph = read_tflite(path)
    report = CensusReport(path, "tflite", ops=[_op_info(graph, op) for op in graph.ops])
    total = graph.total_macs
    for name, fl in wanted:
        if name == "xnnpack":
            res = _xnnpack(graph, total)
            if runtime:
                res.runtime = _compare_runtime(path, res)
        elif name == "nnapi":
            res = _nnapi(graph, total, fl)
        elif is_vela_target(name):
            res = vela_result(path, graph, name)
        else:
            res = _edgetpu(graph, total)
        report.targets[res.target] = res
    return report


def _op_info(graph: TFLiteGraph, op) -> OpInfo:
    x = graph.tensor(op.inputs[0]) if op.inputs and op.inputs[0] >= 0 else None
    y = graph.tensor(op.outputs[0]) if op.outputs else None
    return OpInfo(op.index, op.name, y.name if y is not None else "", x.dtype if x is not None else "-", op.macs)


def _xnnpack(graph: TFLiteGraph, total: int) -> TargetResult:
    verdicts, delegated = XnnpackRules(graph).select()
    return TargetResult("xnnpack", verdicts, delegated, partition(graph, delegated), total)


def _nnapi(graph: TFLiteGraph, total: int, fl: int) -> TargetResult:
    rules = NnapiRules(graph, fl)
    verdicts = {op.index: rules.check(op) for op in graph.ops}
    supported = {i for i, v in verdicts.items() if v.mapped}
    kept = limit_partitions(graph, supported, MAX_PARTITIONS)
    segs = partition(graph, kept)
    note = ""
    dropped = len([s for s in partition(graph, supported) if s.delegated]) - len([s for s in segs if s.delegated])
    if dropped > 0:
        note = f"{dropped} smaller partition(s) left on the CPU: the delegate keeps the {MAX_PARTITIONS} largest"
    return TargetResult(rules.target, verdicts, kept, segs, total, note=note)


def _edgetpu(graph: TFLiteGraph, total: int) -> TargetResult:

    rules = EdgeTpuRules(graph)
    verdicts = {op.index: rules.check(op) for op in graph.ops}
    mapped = {i for i, v in verdicts.items() if v.mapped}
    cut = edgetpu_cut(graph, mapped)
    segs = []
    macs = {op.index: op.macs for op in graph.ops}
    for nodes, on in ((cut.leading_cpu, False), (cut.tpu, True), (cut.cpu_after, False)):
        if nodes:
            segs.append(Segment(on, list(nodes), sum(macs[i] for i in nodes)))
    return TargetResult("edgetpu", verdicts, set(cut.tpu), segs, total, edgetpu=cut)


def _compare_runtime(path: Path, res: TargetResult) -> dict:
    """Load the file in ai-edge-litert and compare its XNNPACK partitions with the census's."""

    got = xnnpack_partitions(path)
    predicted_fatal = bool(res.fatal)
    if "error" in got:
        return {**got, "match": predicted_fatal,
                "differences": [] if predicted_fatal else ["the interpreter failed to load the model"]}
    census_parts = sorted(sorted(s.nodes) for s in res.segments if s.delegated)
    runtime_parts = sorted(got["partitions"])
    diffs = []
    if predicted_fatal:
        diffs.append("census predicted a load failure; the interpreter loaded the model")
    only_census = sorted(res.on_accelerator - set(got["delegated"]))
    only_runtime = sorted(set(got["delegated"]) - res.on_accelerator)
    if only_census:
        diffs.append(f"census delegates ops {only_census[:10]} that the runtime left on the CPU")
    if only_runtime:
        diffs.append(f"runtime delegated ops {only_runtime[:10]} that the census left on the CPU")
    if not only_census and not only_runtime and census_parts != runtime_parts:
        diffs.append(f"same ops, different partitions: census {len(census_parts)}, runtime {len(runtime_parts)}")
    return {**got, "match": not diffs, "differences": diffs}
