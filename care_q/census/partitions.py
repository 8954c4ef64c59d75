"""How a delegate's node list becomes partitions (delegated subgraphs) and CPU islands.

``partition`` is TFLite's ``PartitionGraphIntoIndependentNodeSubsets`` in its default greedy mode
(google-ai-edge/LiteRT ``tflite/graph_info.cc``, used by ``ReplaceNodeSubsetsWithDelegateKernels``
and ``PreviewDelegatePartitioning``): epochs of same-type nodes, each epoch taking every node whose
inputs are ready, in execution order, repeatedly, so independent nodes of one kind join the same
partition even when a node of the other kind sits between them in the plan.

``limit_partitions`` is the NNAPI delegate's ``LimitDelegatedPartitions``
(``tflite/delegates/nnapi/nnapi_delegate.cc``): keep the N largest (default 3).

``edgetpu_cut`` is the Edge TPU compiler's single cut (Coral: "the compiler ... cannot partition
the model more than once, so as soon as an unsupported operation occurs, that operation and
everything after it executes on the CPU").
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Segment:
    delegated: bool
    nodes: list[int] = field(default_factory=list)     # op indices, in the order TFLite assigns them
    macs: int = 0

    def to_dict(self, ops=None) -> dict:
        d = {"delegated": self.delegated, "nodes": list(self.nodes), "macs": self.macs}
        if ops is not None:
            d["ops"] = _op_counts([ops[i].name for i in self.nodes])
        return d


def _op_counts(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def partition(graph, delegated: set[int]) -> list[Segment]:
    """Split the graph's ops into alternating delegated / CPU segments (TFLite's greedy epochs)."""
    ops = graph.ops
    produced = {t for op in ops for t in op.outputs if t >= 0}
    tensor_epoch: dict[int, int] = {}          # tensor -> epoch of its producer (absent: always ready)
    node_done = [False] * len(ops)
    segments: list[Segment] = []
    while True:
        seg: Segment | None = None
        while True:  # BuildNodeSubset: sweep the plan until nothing more can join this epoch
            did = False
            for op in ops:
                if node_done[op.index]:
                    continue
                if any(t >= 0 and t in produced and t not in tensor_epoch for t in op.inputs):
                    continue
                kind = op.index in delegated
                if seg is None:
                    seg = Segment(kind)
                if kind != seg.delegated:
                    continue
                node_done[op.index] = True
                seg.nodes.append(op.index)
                seg.macs += op.macs
                for t in op.outputs:
                    if t >= 0:
                        tensor_epoch[t] = len(segments)
                did = True
            if not did:
                break
        if seg is None or not seg.nodes:
            break
        segments.append(seg)
    if not all(node_done):  # a cycle or a dangling input: report rather than loop
        missing = [op.index for op in ops if not node_done[op.index]]
        segments.append(Segment(False, missing, sum(ops[i].macs for i in missing)))
    return segments


def limit_partitions(graph, delegated: set[int], max_partitions: int) -> set[int]:
    """NNAPI's LimitDelegatedPartitions: keep the nodes of the `max_partitions` largest partitions."""
    segs = [s for s in partition(graph, delegated) if s.delegated]
    if max_partitions <= 0 or len(segs) <= max_partitions:
        return set(delegated)
    keep = sorted(segs, key=lambda s: -len(s.nodes))[:max_partitions]   # std::sort by size, descending
    return {i for s in keep for i in s.nodes}


@dataclass
class EdgeTpuCut:
    leading_cpu: list[int]          # input QUANTIZE ops the compiler leaves on the CPU before the TPU op
    tpu: list[int]                  # the one Edge TPU segment
    first_unmapped: int | None      # op index where the segment ends (None: mapped to the end)
    cpu_after: list[int]            # everything from the first unmapped op on


def edgetpu_cut(graph, mapped: set[int]) -> EdgeTpuCut:
    """The Edge TPU's single segment in execution order.

    Leading QUANTIZE ops that convert a float graph input to 8 bits run on the CPU and do not end
    the segment (the compiler reports them as not mapped, the ops after them still map); the
    first other unmapped op ends it, and that op and every op after it run on the CPU.
    """
    ops = graph.ops
    lead: list[int] = []
    i = 0
    graph_inputs = set(graph.inputs)
    while i < len(ops) and ops[i].index not in mapped and _is_input_quantize(graph, ops[i], graph_inputs):
        lead.append(ops[i].index)
        i += 1
    tpu: list[int] = []
    while i < len(ops) and ops[i].index in mapped:
        tpu.append(ops[i].index)
        i += 1
    first = ops[i].index if i < len(ops) else None
    return EdgeTpuCut(lead, tpu, first, [op.index for op in ops[i:]])


def _is_input_quantize(graph, op, graph_inputs: set[int]) -> bool:
    if op.name != "QUANTIZE" or not op.inputs:
        return False
    x = graph.tensor(op.inputs[0])
    return op.inputs[0] in graph_inputs and x is not None and x.dtype in ("FLOAT32", "FLOAT16")
