"""The suite's ``ptq_time:`` section, issue 3's time budget: the user's command (`care-q ptq --model
care_s1 --calib imagenet_1k_subset`), run as a user runs it (a fresh process, an empty output
folder, so the FP32 files of the latency comparison are exported too), timed from process start to
exit. Redone whenever anything in care_q changes (its code, recipes or dataset definitions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from care_q.bench.keys import package_digest
from care_q.bench.steps import Steps
from care_q.ptq import stage_seconds


def ptq_time_command(cfg: dict, P: dict) -> list[str]:
    """The command as a user types it: the defaults left out."""
    cmd = ["care-q", "ptq", "--model", P["model"], "--calib", P["calib"]]
    for flag, value, default in (("--recipe", P["recipe"], "ptq_int8_cpu"), ("--threads", cfg["threads"], 2),
                                 ("--num-calib", P.get("num_calib"), None)):
        if value != default:
            cmd += [flag, str(value)]
    return cmd


def run_ptq_time(cfg: dict, P: dict, root: Path, steps: Steps, data_root) -> dict:
    d = root / "ptq_time" / P["model"]
    cmd = ptq_time_command(cfg, P)

    def do():
        out = d / "out"
        shutil.rmtree(out, ignore_errors=True)  # nothing reused from an earlier (killed) run
        env = dict(os.environ)
        if data_root:
            env["CARE_Q_DATA"] = str(data_root)
        t0 = time.perf_counter()
        with open(d / "log.txt", "w") as log:
            rc = subprocess.run([sys.executable, "-m", "care_q", *cmd[1:], "--out", str(out)], env=env, stdout=log,
                                stderr=subprocess.STDOUT).returncode
        wall = round(time.perf_counter() - t0, 1)
        if rc != 0:
            tail = (d / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
            return {"command": " ".join(cmd), "seconds": wall, "failure": f"exit code {rc}: {tail[0][:300]}"}
        rep = json.loads((out / "report.json").read_text())
        return {"command": " ".join(cmd), "seconds": wall, "report_seconds": rep["seconds"],
                "images": rep["calibration"]["images"], "stages": _stage_seconds(rep)}

    key = {**P, "threads": cfg["threads"], "code": package_digest()}
    return steps.run(f"ptq_time/{P['model']}", key, do, d)


def _stage_seconds(rep: dict) -> dict[str, float]:
    st = stage_seconds(rep)
    st["other (model, data, tracing, SQNR, report)"] = round(rep["seconds"] - sum(st.values()), 1)
    return st
