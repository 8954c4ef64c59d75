"""Atomic writes: a killed writer's temporary file is swept on the next write, a live one's is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from care_q.utils.io import atomic_write_json, atomic_write_text


def test_stale_temp_of_a_dead_writer_is_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".report.md.{dead_pid}.abc123.tmp"
    live = tmp_path / f".report.md.{os.getpid()}.def456.tmp"   # this process: alive
    other = tmp_path / f".report.json.{dead_pid}.x.tmp"          # another final name: not ours to sweep
    for p in (stale, live, other):
        p.write_text("partial")
    atomic_write_text("done", tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text() == "done"
    assert not stale.exists() and live.exists() and other.exists()


def test_json_takes_numpy_scalars(tmp_path):
    """A comparison of numpy values is np.bool_: a bench result holding one was written only after a
    rerun had read it back as a bool (found when `make bench` failed at its last write)."""
    ratio = np.float64(0.54)
    atomic_write_json({"pass": ratio <= 0.55, "ratio": ratio, "n": np.int64(3), "v": np.arange(2)}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"pass": True, "ratio": 0.54, "n": 3, "v": [0, 1]}
