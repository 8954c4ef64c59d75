"""The latency method (care_q.utils.timing, issue 21): blocks, paired per-round ratios, their
spread, and the process of its own, checked with fake runners of known cost (a fake clock the
runners advance, or real sleeps) instead of timings of real models."""

from __future__ import annotations

import os
import time
from functools import partial

import numpy as np
import pytest

from care_q.errors import CareQError
from care_q.utils.timing import block_sizes, measure_blocks, measure_isolated, run_isolated

X = np.zeros((1, 3, 4, 4), np.float32)
CLOCK = [0.0]     # the fake clock (seconds); in a child process, the child's own copy
LOADED: list = []  # names of runners built in this process


def fake_clock() -> float:
    return CLOCK[0]


class CostRunner:
    """A runner whose every invoke advances the fake clock by ``cost_ms(i)`` (i: the invoke's
    index, warm-up included), or sleeps that long with ``sleep=True``."""

    def __init__(self, name, cost_ms, sleep=False):
        self.name, self.cost_ms, self.sleep, self.i = name, cost_ms, sleep, 0
        self.prepared = None
        LOADED.append(name)

    def prepare(self, x):
        self.prepared = x.shape

    def invoke(self):
        ms = self.cost_ms(self.i)
        self.i += 1
        if self.sleep:
            time.sleep(ms / 1e3)
        else:
            CLOCK[0] += ms / 1e3


class LoggedRunner(CostRunner):
    """A CostRunner that appends its name and process id to ``log`` when it is built."""

    def __init__(self, log, name, ms):
        with open(log, "a") as f:
            f.write(f"{name} {os.getpid()}\n")
        super().__init__(name, partial(const, ms))


def const(ms, i):
    return ms


def drifting(ms, i):
    """The machine slows down with time (the fake clock): +10% per 10 ms, alike for every artifact."""
    return ms * (1 + 10 * CLOCK[0])


def failing_factory():
    raise CareQError("broken.tflite: the TFLite interpreter could not load it")


def pid_and_loaded():
    return os.getpid(), list(LOADED)


def abort():
    os.abort()


def test_blocks_and_paired_ratios_exact_with_known_costs():
    """int8 costs 3 ms, FP32 6 ms: every round's ratio is 0.5, in every block; 3 blocks of 4 rounds."""
    rounds = []
    r = {"fp32": CostRunner("fp32", partial(const, 6.0)), "int8": CostRunner("int8", partial(const, 3.0))}
    res = measure_blocks(r, X, reference="fp32", blocks=3, runs=4, warmup=2, clock=fake_clock,
                         advance=rounds.append)
    assert len(rounds) == 12 and r["int8"].i == 2 + 12 and r["fp32"].prepared == (1, 3, 4, 4)
    i8, fp = res["int8"], res["fp32"]
    assert i8["runs"] == 12 and i8["blocks"] == 3 and i8["block_median_ms"] == pytest.approx([3.0] * 3)
    assert i8["median_ms"] == pytest.approx(3.0) and fp["median_ms"] == pytest.approx(6.0)
    assert i8["ratio"] == pytest.approx(0.5) and i8["block_ratios"] == pytest.approx([0.5] * 3)
    assert i8["ratio_spread"] == pytest.approx([0.5, 0.5]) and i8["reference"] == "fp32"
    assert fp["ratio"] == 1.0 and fp["ratio_spread"] == [1.0, 1.0]


def test_interleaving_cancels_drift_and_spread_shows_a_disturbed_block():
    """A machine that slows down over time changes every block's medians but hardly the ratio (the
    rounds interleave the artifacts, order rotated); a block in which only one artifact is slowed
    shows up as the spread, while the overall median ratio resists it."""
    CLOCK[0] = 0.0
    r = {"fp32": CostRunner("fp32", partial(drifting, 4.0)), "int8": CostRunner("int8", partial(drifting, 2.0))}
    res = measure_blocks(r, X, reference="fp32", blocks=3, runs=6, warmup=0, clock=fake_clock)
    med = res["int8"]["block_median_ms"]
    assert med[2] > 1.3 * med[1] > 1.3 ** 2 * med[0]            # the drift is there ...
    assert res["int8"]["block_ratios"] == pytest.approx([0.5] * 3, rel=0.02)  # ... and not in the ratio
    assert res["int8"]["ratio"] == pytest.approx(0.5, rel=0.02)

    # int8 is 2 ms except in the second block (rounds 4..7 after 1 warm-up), where it takes 3 ms
    r = {"fp32": CostRunner("fp32", partial(const, 4.0)),
         "int8": CostRunner("int8", lambda i: 3.0 if 5 <= i <= 8 else 2.0)}
    res = measure_blocks(r, X, reference="fp32", blocks=3, runs=4, warmup=1, clock=fake_clock)
    assert res["int8"]["block_ratios"] == pytest.approx([0.5, 0.75, 0.5])
    assert res["int8"]["ratio_spread"] == pytest.approx([0.5, 0.75])
    assert res["int8"]["ratio"] == pytest.approx(0.5)           # median over the 12 rounds: 8 of them at 0.5


def test_measure_blocks_rejects_bad_settings():
    r = {"a": CostRunner("a", partial(const, 1.0))}
    with pytest.raises(CareQError, match="runs and blocks must be >= 1"):
        measure_blocks(r, X, runs=0)
    with pytest.raises(CareQError, match="reference 'fp32' is not one of the runners"):
        measure_blocks(r, X, reference="fp32")
    with pytest.raises(CareQError, match="at least 3 blocks"):
        measure_isolated({"a": ({"a": partial(CostRunner, "a", partial(const, 1.0))}, None)}, X, blocks=2)
    assert block_sizes(50, 3) == 17 and block_sizes(2, 3) == 1


def test_isolated_runs_every_block_in_a_fresh_process_spread_over_the_measurement(tmp_path):
    """Two comparisons of 3 blocks: six fresh child processes, none of them this one, taken in turn
    (block 1 of each, block 2 of each, ...); the runners are built there, not here; the fake costs
    give the exact ratio; a runner that fails to load is reported by name, the others measured."""
    LOADED.clear()
    CLOCK[0] = 0.0
    log = tmp_path / "log"
    jobs = {"x": ({"fp32": partial(LoggedRunner, log, "x.fp32", 5.0), "int8": partial(LoggedRunner, log, "x.int8", 2.0),
                   "bad": failing_factory}, "fp32"),
            "y": ({"fp32": partial(LoggedRunner, log, "y.fp32", 4.0), "int8": partial(LoggedRunner, log, "y.int8", 3.0)},
                  "fp32")}
    progress = []
    res = measure_isolated(jobs, X, blocks=3, runs=5, warmup=1, clock=fake_clock, advance=progress.append)
    assert len(progress) == 6 and LOADED == [] and CLOCK[0] == 0.0     # nothing loaded or run in this process
    pids = res["x"]["pids"] + res["y"]["pids"]
    assert len(set(pids)) == 6 and os.getpid() not in pids
    built = [line.split() for line in log.read_text().splitlines()]   # (runner, pid) in construction order
    assert [name for name, _ in built] == ["x.fp32", "x.int8", "y.fp32", "y.int8"] * 3
    assert [int(pid) for name, pid in built if name == "x.int8"] == res["x"]["pids"]
    x = res["x"]["results"]
    assert set(x) == {"fp32", "int8"} and "could not load" in res["x"]["load_failures"]["bad"]
    assert x["int8"]["ratio"] == pytest.approx(0.4) and x["int8"]["runs"] == 15 and x["int8"]["blocks"] == 3
    assert x["int8"]["ratio_spread"] == pytest.approx([0.4, 0.4]) and x["fp32"]["ratio"] == 1.0
    assert res["y"]["results"]["int8"]["ratio"] == pytest.approx(0.75) and res["y"]["error"] is None
    assert 0.0 <= x["int8"]["other_cpu_share"] <= 1.0
    pid, loaded = run_isolated(pid_and_loaded)                  # a fresh process has loaded nothing
    assert pid != os.getpid() and loaded == []


def test_isolated_child_that_dies_is_an_error_naming_it():
    with pytest.raises(CareQError, match=r"timing a, b: the child process exited with code -6"):
        run_isolated(abort, what="timing a, b")
    with pytest.raises(CareQError, match="ZeroDivisionError"):
        run_isolated(divmod, 1, 0)
    res = measure_isolated({"dies": ({"a": abort}, None)}, X, blocks=3, runs=1)["dies"]
    assert res["results"] == {} and len(res["pids"]) == 0 and "exited with code -6" in res["error"]


def test_real_clock_with_sleeping_runners():
    """Real time: 4 ms against 8 ms of sleep (sleep is not CPU-bound, so other load moves it little)."""
    factories = {"fp32": partial(CostRunner, "fp32", partial(const, 8.0), sleep=True),
                 "int8": partial(CostRunner, "int8", partial(const, 4.0), sleep=True)}
    res = measure_isolated({"pair": (factories, "fp32")}, X, blocks=3, runs=6, warmup=1)["pair"]["results"]
    assert 0.4 <= res["int8"]["ratio"] <= 0.56
    lo, hi = res["int8"]["ratio_spread"]
    assert lo <= res["int8"]["ratio"] <= hi and lo == min(res["int8"]["block_ratios"])
    assert res["fp32"]["median_ms"] >= 8.0 and res["int8"]["median_ms"] >= 4.0
