"""Learning-rate schedules, per optimizer step, for `torch.optim.lr_scheduler.LambdaLR`.

    sched = LambdaLR(opt, lr_lambda(warmup=100, total=5000))            # training from scratch
    sched = LambdaLR(opt, lr_lambda(warmup, total, schedule="constant"))  # a QAT recipe's choice
"""

from __future__ import annotations

import math
from collections.abc import Callable

from care_q.errors import CareQError

SCHEDULES = ("cosine", "constant")


def lr_lambda(warmup: int, total: int, schedule: str = "cosine") -> Callable[[int], float]:
    """The factor on the base learning rate at optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup`` for the first ``warmup`` steps, then ``cosine``: half a
    cosine from 1 down to 0 at step ``total`` (0 after it), or ``constant``: 1.
    """
    if schedule not in SCHEDULES:
        raise CareQError(f"unknown learning-rate schedule '{schedule}'; known: {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return factor
