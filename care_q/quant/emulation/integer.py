"""Exact integer accumulation of convolutions and matmuls, the sums every integer runtime forms
(int32 accumulators) before its requantization."""

from __future__ import annotations

import torch

F32_EXACT = 2.0 ** 24  # every integer of magnitude below this is a float32


def integer_product(op, x_int: torch.Tensor, w_int: torch.Tensor, w_bound: torch.Tensor | float) -> torch.Tensor:
    """``op(x_int, w_int)`` of integer-valued tensors (a conv or matmul: a sum of products),
    computed exactly and returned as float64.

    ``w_bound`` bounds ``sum_k |w_k|`` over any one output's terms. Where
    ``max|x| * w_bound < 2^24`` every partial sum is an integer that float32 holds exactly, so
    the fast float32 kernel gives the exact result in any summation order. Otherwise x is split
    into 16 * hi + lo (|hi| <= max|x| / 16 + 1, 0 <= lo <= 15) and the two float32 products are
    combined in float64, if each is provably exact; float64 (slow, exact) is the last resort."""
    w_bound = float(w_bound)
    x_max = float(x_int.abs().max()) if x_int.numel() else 0.0
    if x_max * w_bound < F32_EXACT:
        return op(x_int.float(), w_int.float()).double()
    hi = torch.floor(x_int / 16.0)
    lo = x_int - 16.0 * hi  # in [0, 16)
    if max(x_max / 16.0 + 1.0, 15.0) * w_bound < F32_EXACT:
        wf = w_int.float()
        return 16.0 * op(hi.float(), wf).double() + op(lo.float(), wf).double()
    return op(x_int.double(), w_int.double())
