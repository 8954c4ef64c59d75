"""One target's decision on one op, with the rule that decided it."""

from __future__ import annotations

from dataclasses import dataclass

FLOAT_TYPES = ("FLOAT32", "FLOAT16")


@dataclass(frozen=True)
class Verdict:
    mapped: bool          # the target's support check accepts the op
    rule: str             # why: the first rule that rejects it, or what made it acceptable
    fatal: str = ""       # accepted by the check, but the runtime then fails to build it (load error)

    def to_dict(self) -> dict:
        d = {"mapped": self.mapped, "rule": self.rule}
        if self.fatal:
            d["fatal"] = self.fatal
        return d


def ok(rule: str) -> Verdict:
    return Verdict(True, rule)


def no(rule: str) -> Verdict:
    return Verdict(False, rule)


def first_failure(*checks: str | None) -> str | None:
    """The first non-empty failure message of a sequence of checks (None when all pass)."""
    for c in checks:
        if c:
            return c
    return None
