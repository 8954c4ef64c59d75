"""The census report: per-op verdicts per target, partitions, MAC shares; JSON and rich tables."""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from pathlib import Path

from care_q.census.partitions import EdgeTpuCut, Segment
from care_q.census.verdict import Verdict


@dataclass
class TargetResult:
    target: str                              # xnnpack | nnapi:FL<n> | edgetpu | an Ethos-U config (ethos-u55-128)
    verdicts: dict[int, Verdict]             # op index -> verdict of the target's check
    on_accelerator: set[int]                 # ops that run on the accelerator after partitioning
    segments: list[Segment]                  # delegated subgraphs and CPU islands, execution order
    macs_total: int
    edgetpu: EdgeTpuCut | None = None
    note: str = ""                           # e.g. NNAPI partitions dropped by the 3-partition limit
    runtime: dict | None = None              # XNNPACK: what ai-edge-litert delegated, and the comparison
    source: str = "rules"                    # rules: care-q's static rules | compiled: a real compiler (Vela)
    compiled: dict | None = None             # compiled: the compiler's figures (memory, estimated time, ...)

    @property
    def macs_on_accelerator(self) -> int:
        return sum(s.macs for s in self.segments if s.delegated)

    @property
    def mac_share(self) -> float | None:
        return self.macs_on_accelerator / self.macs_total if self.macs_total else None

    @property
    def partitions(self) -> int:
        return sum(1 for s in self.segments if s.delegated)

    @property
    def fatal(self) -> list[str]:
        return [f"#{i}: {v.fatal}" for i, v in sorted(self.verdicts.items()) if v.fatal]

    def to_dict(self, ops) -> dict:
        d = {"target": self.target, "source": self.source, "partitions": self.partitions,
             "ops_on_accelerator": len(self.on_accelerator), "ops_total": len(ops),
             "macs_on_accelerator": self.macs_on_accelerator, "macs_total": self.macs_total,
             "mac_share": self.mac_share,
             "cpu_ops": _counts(ops[i].name for i in range(len(ops)) if i not in self.on_accelerator),
             "segments": [s.to_dict(ops) for s in self.segments],
             "fatal": self.fatal}
        if self.note:
            d["note"] = self.note
        if self.edgetpu is not None:
            cut = self.edgetpu
            d["edgetpu"] = {
                "leading_cpu_ops": cut.leading_cpu, "tpu_ops": len(cut.tpu),
                "first_unmapped": None if cut.first_unmapped is None else {
                    "index": cut.first_unmapped, "op": ops[cut.first_unmapped].name,
                    "output": ops[cut.first_unmapped].output_name,
                    "rule": self.verdicts[cut.first_unmapped].rule},
                "mac_share_before_first_unmapped": self.mac_share,
                "cpu_ops_after_cut": len(cut.cpu_after)}
        if self.runtime is not None:
            d["runtime"] = self.runtime
        if self.compiled is not None:
            d["compiled"] = self.compiled
            d["cpu_reasons"] = self.cpu_reasons(ops)
        return d

    def cpu_reasons(self, ops) -> dict[str, dict[str, int]]:
        """CPU ops by type, each with its reasons and how many ops gave each (for a compiled target, a
        reason's trailing '(tensor name)' is dropped so that equal reasons group)."""
        out: dict[str, collections.Counter] = {}
        for i in range(len(ops)):
            if i not in self.on_accelerator:
                rule = re.sub(r" \([^()]*\)$", "", self.verdicts[i].rule) if self.compiled else self.verdicts[i].rule
                out.setdefault(ops[i].name, collections.Counter())[rule] += 1
        return {k: dict(v.most_common()) for k, v in out.items()}

    def summary(self, ops) -> str:
        if self.compiled is not None:
            return self._compiled_summary(ops)
        share = "n/a" if self.mac_share is None else f"{self.mac_share:.1%}"
        cpu = _counts(ops[i].name for i in range(len(ops)) if i not in self.on_accelerator)
        cpu_s = ", ".join(f"{k} x{v}" for k, v in list(cpu.items())[:8]) or "none"
        if len(cpu) > 8:
            cpu_s += f", ... ({len(cpu) - 8} more op types)"
        if self.edgetpu is not None:
            cut = self.edgetpu
            if cut.first_unmapped is None:
                head = f"all {len(cut.tpu)} ops after {len(cut.leading_cpu)} input op(s) on the Edge TPU"
            else:
                op = ops[cut.first_unmapped]
                head = (f"first unmapped op #{op.index} {op.name} ('{op.output_name}'): "
                        f"{self.verdicts[op.index].rule}; {len(cut.tpu)} ops on the TPU before it, "
                        f"{len(cut.cpu_after)} on the CPU from it")
            return f"{self.target}: {head}; {share} of MACs on the Edge TPU"
        s = (f"{self.target}: {self.partitions} partition(s), {len(self.on_accelerator)}/{len(ops)} ops, "
             f"{share} of MACs on the accelerator; CPU: {cpu_s}")
        if self.note:
            s += f" ({self.note})"
        if self.fatal:
            s += f"; LOAD FAILS: {self.fatal[0]}"
        return s

    def _compiled_summary(self, ops) -> str:
        c = self.compiled or {}
        share = "n/a" if self.mac_share is None else f"{self.mac_share:.1%}"
        cpu = self.cpu_reasons(ops)
        cpu_s = "; ".join(f"{name} x{sum(r.values())} ({' | '.join(r)})" for name, r in list(cpu.items())[:6])
        if len(cpu) > 6:
            cpu_s += f"; ... ({len(cpu) - 6} more op types)"
        between = [len(s.nodes) for j, s in enumerate(self.segments) if not s.delegated
                   and any(t.delegated for t in self.segments[:j]) and any(t.delegated for t in self.segments[j + 1:])]
        mem = ", ".join(f"{k} {v:.1f} KiB" for k, v in c.get("memory_kib", {}).items())
        clock = c.get("clock_hz", 0) / 1e6
        return (f"{self.target} ({c.get('compiler', 'compiled')}): {self.partitions} NPU segment(s) "
                f"({sum(between)} CPU op(s) between them), {len(self.on_accelerator)}/{len(ops)} ops and {share} of "
                f"MACs on the NPU; CPU: {cpu_s or 'none'}; {mem}; estimated "
                f"{c.get('inference_time_s', float('nan')) * 1e3:.3g} ms ({c.get('cycles_total', 0):,} cycles at "
                f"{clock:.0f} MHz, {c.get('system_config', '?')}, {c.get('memory_mode', '?')})")


@dataclass
class OpInfo:
    index: int
    name: str
    output_name: str
    dtype: str                # first input's type (the activation)
    macs: int


@dataclass
class CensusReport:
    path: Path
    kind: str                                 # tflite | onnx
    ops: list[OpInfo] = field(default_factory=list)
    targets: dict[str, TargetResult] = field(default_factory=dict)
    onnx: dict | None = None                  # ONNX: onnxruntime CPU fusion census

    @property
    def macs_total(self) -> int:
        return sum(o.macs for o in self.ops)

    def to_dict(self) -> dict:
        d: dict = {"path": str(self.path), "kind": self.kind}
        if self.kind == "tflite":
            d["macs_total"] = self.macs_total
            d["targets"] = {k: t.to_dict(self.ops) for k, t in self.targets.items()}
            d["ops"] = [{"index": o.index, "op": o.name, "output": o.output_name, "dtype": o.dtype, "macs": o.macs,
                         **{k: t.verdicts[o.index].to_dict() for k, t in self.targets.items()}} for o in self.ops]
        else:
            d["onnxruntime_cpu"] = self.onnx
        return d

    def summary_lines(self) -> list[str]:
        if self.kind == "onnx":
            o = self.onnx or {}
            share = o.get("mac_share_integer")
            lines = [f"onnxruntime CPU EP: {sum(o.get('integer_ops', {}).values())} integer kernels "
                     f"({_fmt_counts(o.get('integer_ops', {}))}), "
                     f"{sum(o.get('integer_data_movement', {}).values())} integer data-movement ops",
                     f"float islands (DequantizeLinear -> op -> QuantizeLinear): "
                     f"{_fmt_counts(o.get('float_islands', {})) or 'none'}; other float ops: "
                     f"{_fmt_counts(o.get('float_ops', {})) or 'none'}"]
            if share is not None:
                lines.append(f"{share:.1%} of Conv/MatMul/Gemm MACs in integer kernels")
            return lines
        return [t.summary(self.ops) for t in self.targets.values()]

    # ------------------------------------------------------------------ rich output
    def render(self, console, all_ops: bool = False) -> None:
        from rich.table import Table

        if self.kind == "onnx":
            self._render_onnx(console)
            return
        names = list(self.targets)
        table = Table(title=f"{self.path.name}: op census ({'every op' if all_ops else 'grouped by op and dtype'})")
        table.add_column("op", overflow="fold")
        table.add_column("dtype")
        table.add_column("n" if not all_ops else "#", justify="right")
        table.add_column("MACs", justify="right")
        for n in names:
            table.add_column(n + (" (Vela)" if self.targets[n].source == "compiled" else ""), justify="center")
        table.add_column("rule (first CPU target's, else first target's)", overflow="fold")
        rows = self._rows(all_ops)
        for key, members in rows:
            name, dtype = key[0], key[1]
            first = members[0]
            macs = sum(self.ops[i].macs for i in members)
            marks = []
            for n in names:
                t = self.targets[n]
                on = [i in t.on_accelerator for i in members]
                v = t.verdicts[first]
                mark = ("[green]yes[/green]" if all(on) else "[red]no[/red]" if not any(on) else
                        f"[yellow]{sum(on)}/{len(on)}[/yellow]")
                if v.fatal:
                    mark = "[red]FAILS[/red]"
                elif v.mapped and not all(on):
                    mark += " (cut)" if t.edgetpu is not None else " (limit)"
                marks.append(mark)
            rule_from = next((self.targets[n] for n in names if not self.targets[n].verdicts[first].mapped
                              or self.targets[n].verdicts[first].fatal), self.targets[names[0]])
            v = rule_from.verdicts[first]
            rule = (f"{rule_from.target}: " if len(names) > 1 else "") + (v.fatal or v.rule)
            label = name if not all_ops else f"{name} {self.ops[first].output_name}"
            table.add_row(label, dtype, str(len(members)) if not all_ops else str(first),
                          _fmt_macs(macs), *marks, rule)
        console.print(table)
        for line in self.summary_lines():
            console.print(line)
        for t in self.targets.values():
            if t.runtime is not None:
                console.print(_runtime_line(t))
        console.print(self.sources_line())

    def sources_line(self) -> str:
        """Which verdicts a compiler made and which care-q's rules predicted."""
        compiled = [f"{n} ({t.compiled.get('compiler', 'compiled') if t.compiled else 'compiled'})"
                    for n, t in self.targets.items() if t.source == "compiled"]
        rules = [n + (" (checked against ai-edge-litert)" if t.runtime is not None else "")
                 for n, t in self.targets.items() if t.source != "compiled"]
        parts = []
        if compiled:
            parts.append("compiled, the authority: " + ", ".join(compiled))
        if rules:
            parts.append("rule-based (care-q's static rules): " + ", ".join(rules))
        return "verdicts " + "; ".join(parts)

    def _rows(self, all_ops: bool):
        if all_ops:
            return [((o.name, o.dtype), [o.index]) for o in self.ops]
        groups: dict[tuple, list[int]] = collections.OrderedDict()
        for o in self.ops:
            key = (o.name, o.dtype) + tuple((t.verdicts[o.index].mapped, o.index in t.on_accelerator,
                                             bool(t.verdicts[o.index].fatal)) for t in self.targets.values())
            groups.setdefault(key, []).append(o.index)
        return list(groups.items())

    def _render_onnx(self, console) -> None:
        from rich.table import Table

        o = self.onnx or {}
        table = Table(title=f"{self.path.name}: onnxruntime CPU EP after graph optimization")
        table.add_column("kind")
        table.add_column("ops", overflow="fold")
        table.add_column("n", justify="right")
        for kind, label in (("integer_ops", "integer kernels"), ("integer_data_movement", "integer data movement"),
                            ("float_islands", "float islands (DQ -> op -> Q)"), ("float_ops", "float ops"),
                            ("qdq", "Q / DQ left")):
            counts = o.get(kind, {})
            table.add_row(label, _fmt_counts(counts) or "-", str(sum(counts.values())))
        console.print(table)
        islands = o.get("float_island_nodes", [])
        if islands:
            console.print("float islands: " + ", ".join(f"{n['op_type']} {n['name']}" for n in islands))
        for line in self.summary_lines():
            console.print(line)


def _runtime_line(t: TargetResult) -> str:
    r = t.runtime or {}
    if "error" in r:
        verdict = "census predicted it" if r.get("match") else "census did NOT predict it"
        return f"ai-edge-litert ({t.target}): the interpreter fails to load the model: {r['error']} ({verdict})"
    status = "[green]matches[/green]" if r.get("match") else "[red]DIFFERS[/red]"
    s = (f"ai-edge-litert ({t.target}): {len(r.get('partitions', []))} partition(s), "
         f"{len(r.get('delegated', []))}/{r.get('total_nodes')} ops delegated: {status} the census")
    if not r.get("match") and r.get("differences"):
        s += f" ({'; '.join(r['differences'][:5])})"
    return s


def _counts(names) -> dict[str, int]:
    return dict(collections.Counter(names).most_common())


def _fmt_counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in d.items())


def _fmt_macs(m: int) -> str:
    if m == 0:
        return "-"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if m >= f:
            return f"{m / f:.2f}{unit}"
    return str(m)
