"""The units reconstruction works through, in execution order: the stem (with the input's
quantization), each downsample, each CARE block, the head (pool -> GELU -> LayerNorm -> FC).

Each unit runs a piece of `DeployCARE.forward` with any `Ops`; chained with `FloatOps` they
compute the deploy form's forward exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from care_q.graph.ops import Ops
from care_q.graph.roles import Role


@dataclass(frozen=True)
class Unit:
    name: str
    run: Callable[[torch.Tensor, Ops], torch.Tensor]


def units_of(dmodel) -> list[Unit]:
    """The units of a `DeployCARE` (see the module docstring)."""
    units = [Unit("stem", lambda x, ops: ops.conv("stem", ops.input("input", x), dmodel.stem))]
    prev = 0
    for name, s, blk in zip(dmodel.block_names(), dmodel.stage_of_block, dmodel.blocks):
        if s != prev:
            prev = s
            ds = f"stages.{s}.downsample"
            units.append(Unit(ds, lambda x, ops, ds=ds, m=dmodel.downsample[s]: ops.conv(ds, x, m)))
        units.append(Unit(name, lambda x, ops, blk=blk, name=name: blk(x, ops, name)))
    units.append(Unit("head", lambda x, ops: _head(dmodel, x, ops)))
    return units


def _head(dmodel, x: torch.Tensor, ops: Ops) -> torch.Tensor:
    """`DeployCARE.forward` after the features."""
    x = ops.tag(Role.POOL, ops.global_pool("head.pool", x))
    x = ops.tag(Role.HEAD, ops.gelu("head.act", x))
    x = ops.tag(Role.HEAD, ops.layer_norm("head.norm", x, dmodel.ln_eps))
    return ops.output("logits", ops.tag(Role.HEAD, ops.linear("head.fc", x, dmodel.fc)))
