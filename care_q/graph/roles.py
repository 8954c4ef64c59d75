"""Tensor roles: the classes of tensors in the deploy form, which recipes address.

The deploy form gives each tensor its role where the op producing it is called
(``ops.tag(Role.ATTN_PHI, ops.add_const(...))``, see `care_q.graph.ops.Ops.tag`); the tracer
records it on the graph node and `care_q.quant.plan.build_plan` reads it from there. A tensor
whose op gives no role is ``conv`` (graph input: ``input``).
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """Tensor classes of the CARE deploy form; recipes address tensors by these."""

    INPUT = "input"
    CONV = "conv"                  # conv / linear outputs and data movement not covered below
    RESIDUAL = "residual"          # residual-stream adds, block outputs
    LAYER_SCALE = "layer_scale"    # gamma * inner residual
    GELU = "gelu"
    ATTN_QK = "attn_qk"            # q, k projections (pre-kernel)
    ATTN_ELU = "attn_elu"          # elu(q), elu(k)
    ATTN_PHI = "attn_phi"          # elu(x) + 1 kernels
    ATTN_KV = "attn_kv"            # k^T v product and kv = k^T v / N
    ATTN_KMEAN = "attn_kmean"      # mean of phi(k) over tokens
    ATTN_DEN = "attn_den"          # normaliser q . mean(k) (+ eps)
    ATTN_DEN_INV = "attn_den_inv"  # 1 / normaliser (recipe substitutions.normaliser: reciprocal)
    ATTN_NUM = "attn_num"          # q @ kv
    ATTN_OUT = "attn_out"          # normalised attention output
    POOL = "pool"                  # global average pool before the head
    HEAD = "head"                  # head tensors (float on every target)
