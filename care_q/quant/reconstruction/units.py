"""The units reconstruction works through, in execution order: the stem (with the input's
quantization), each downsample, each CARE block, the head (`forward_head`: pool -> GELU -> LayerNorm ->
FC, or the NPU graph's head).

Each unit runs a piece of `DeployCARE.forward` with any `Ops`; chained with `FloatOps` they
compute the deploy form's forward exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from care_q.graph.ops import Ops


@dataclass(frozen=True)
class Unit:
    name: str
    run: Callable[[torch.Tensor, Ops], torch.Tensor]
    module: nn.Module | None = None  # what holds the unit's parameters (None: the head, parameters of the model)


def units_of(dmodel) -> list[Unit]:
    """The units of a `DeployCARE` (see the module docstring)."""
    units = [Unit("stem", lambda x, ops: ops.conv("stem", ops.input("input", x), dmodel.stem), dmodel.stem)]
    prev = 0
    for name, s, blk in zip(dmodel.block_names(), dmodel.stage_of_block, dmodel.blocks):
        if s != prev:
            prev = s
            ds = f"stages.{s}.downsample"
            units.append(Unit(ds, lambda x, ops, ds=ds, m=dmodel.downsample[s]: ops.conv(ds, x, m),
                              dmodel.downsample[s]))
        units.append(Unit(name, lambda x, ops, blk=blk, name=name: blk(x, ops, name), blk))
    units.append(Unit("head", dmodel.forward_head))  # the NPU graph's head too (NPUHeadCARE)
    return units
