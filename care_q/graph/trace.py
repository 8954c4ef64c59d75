"""Record the deploy form as a graph of named ops, for the exporters.

`trace(model, x)` runs `DeployCARE.forward(x, TraceOps())` on a real input and returns a
`Graph`: nodes in execution order, each with its op kind, input and output tensor names,
attributes, the role its outputs were given (`Ops.tag`, None if none) and (for conv/linear)
the module holding the weights, plus every tensor's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from care_q.graph.ops import Ops
from care_q.graph.roles import Role


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    module: object | None = None
    role: Role | None = None


@dataclass
class Graph:
    nodes: list[Node]
    shapes: dict[str, tuple[int, ...]]
    input: str
    output: str

    def producer(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def tensors(self) -> list[str]:
        seen = [self.input]
        for n in self.nodes:
            seen.extend(n.outputs)
        return seen

    def census(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for n in self.nodes:
            c[n.op] = c.get(n.op, 0) + 1
        return c


class TraceOps(Ops):
    """Executes like FloatOps and records every call."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._names: dict[int, str] = {}
        self._keep: list[torch.Tensor] = []  # keeps ids unique while tracing
        self._producer: dict[str, Node] = {}
        self.input_name = self.output_name = None

    def _name_of(self, t: torch.Tensor) -> str:
        try:
            return self._names[id(t)]
        except KeyError:
            raise RuntimeError("tensor not produced by a traced op (a torch op outside Ops?)") from None

    def _record(self, op, name, inputs, outputs, attrs=None, module=None):
        outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        out_names = [name] if len(outs) == 1 else [f"{name}:{i}" for i in range(len(outs))]
        for t, n in zip(outs, out_names):
            if n in self.shapes:
                raise RuntimeError(f"tensor name '{n}' used twice")
            self._names[id(t)] = n
            self._keep.append(t)
            self.shapes[n] = tuple(t.shape)
        node = Node(op, name, [self._name_of(t) for t in inputs], out_names, attrs or {}, module)
        self.nodes.append(node)
        self._producer.update((n, node) for n in out_names)
        return outputs

    def tag(self, role, x):
        first = x[0] if isinstance(x, (list, tuple)) else x
        node = self._producer.get(self._name_of(first))
        if node is None:
            raise RuntimeError(f"tensor '{self._name_of(first)}' has no producing op to give role {role.value}")
        if node.role is not None and node.role != role:
            raise RuntimeError(f"'{node.name}' tagged {node.role.value} and {role.value}")
        node.role = Role(role)
        return x

    def input(self, name, x):
        self._names[id(x)] = name
        self._keep.append(x)
        self.shapes[name] = tuple(x.shape)
        self.input_name = name
        return x

    def output(self, name, x):
        self.output_name = self._name_of(x)
        return x

    def conv(self, name, x, conv):
        return self._record("conv", name, [x], super().conv(name, x, conv), {
            "stride": tuple(conv.stride), "padding": tuple(conv.padding), "groups": conv.groups,
            "kernel": tuple(conv.kernel_size)}, conv)

    def linear(self, name, x, fc):
        return self._record("linear", name, [x], super().linear(name, x, fc), {}, fc)

    def add(self, name, a, b):
        return self._record("add", name, [a, b], super().add(name, a, b))

    def mul(self, name, a, b):
        return self._record("mul", name, [a, b], super().mul(name, a, b))

    def add_const(self, name, x, value):
        return self._record("add_const", name, [x], super().add_const(name, x, value), {"value": value})

    def mul_const(self, name, x, value):
        if isinstance(value, torch.nn.Parameter):
            v = value  # live: QAT trains it (the NPU attention's out_scale), the exporters read the trained values
        else:
            v = value.detach().clone() if isinstance(value, torch.Tensor) else float(value)
        return self._record("mul_const", name, [x], super().mul_const(name, x, value), {"value": v})

    def div(self, name, a, b):
        return self._record("div", name, [a, b], super().div(name, a, b))

    def sub(self, name, a, b):
        return self._record("sub", name, [a, b], super().sub(name, a, b))

    def rsqrt(self, name, x):
        return self._record("rsqrt", name, [x], super().rsqrt(name, x))

    def retoken(self, name, x, kind):
        return self._record("retoken", name, [x], super().retoken(name, x, kind), {"kind": kind})

    def reciprocal(self, name, x):
        return self._record("reciprocal", name, [x], super().reciprocal(name, x))

    def gelu(self, name, x):
        return self._record("gelu", name, [x], super().gelu(name, x))

    def silu(self, name, x):
        return self._record("silu", name, [x], super().silu(name, x))

    def elu(self, name, x):
        return self._record("elu", name, [x], super().elu(name, x))

    def relu(self, name, x):
        return self._record("relu", name, [x], super().relu(name, x))

    def sigmoid(self, name, x):
        return self._record("sigmoid", name, [x], super().sigmoid(name, x))

    def l2_norm(self, name, x):
        return self._record("l2_norm", name, [x], super().l2_norm(name, x))

    def to_tokens(self, name, x, kind):
        return self._record("to_tokens", name, [x], super().to_tokens(name, x, kind), {"kind": kind})

    def from_tokens(self, name, x, hw):
        return self._record("from_tokens", name, [x], super().from_tokens(name, x, hw), {"hw": tuple(hw)})

    def mean_axis(self, name, x, axis):
        return self._record("mean_axis", name, [x], super().mean_axis(name, x, axis), {"axis": axis})

    def split(self, name, x, sizes, dim=1):
        return self._record("split", name, [x], super().split(name, x, sizes, dim),
                            {"sizes": list(sizes), "dim": dim})

    def cat(self, name, xs, dim=1):
        return self._record("cat", name, list(xs), super().cat(name, xs, dim), {"dim": dim})

    def to_heads(self, name, x, num_heads):
        return self._record("to_heads", name, [x], super().to_heads(name, x, num_heads),
                            {"num_heads": num_heads})

    def from_heads(self, name, x, hw):
        return self._record("from_heads", name, [x], super().from_heads(name, x, hw), {"hw": tuple(hw)})

    def matmul(self, name, a, b, transpose_a=False, transpose_b=False):
        return self._record("matmul", name, [a, b], super().matmul(name, a, b, transpose_a, transpose_b),
                            {"transpose_a": transpose_a, "transpose_b": transpose_b})

    def mean_tokens(self, name, x):
        return self._record("mean_tokens", name, [x], super().mean_tokens(name, x))

    def global_pool(self, name, x):
        return self._record("global_pool", name, [x], super().global_pool(name, x))

    def layer_norm(self, name, x, eps):
        return self._record("layer_norm", name, [x], super().layer_norm(name, x, eps), {"eps": eps})


@torch.no_grad()
def trace(model, x: torch.Tensor) -> Graph:
    ops = TraceOps()
    model(x, ops)
    return Graph(ops.nodes, ops.shapes, ops.input_name, ops.output_name)
