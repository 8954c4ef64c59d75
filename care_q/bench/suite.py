"""`make bench`: the benchmark suite defined in ``eval/suite.yaml``, written to ``eval/BENCHMARKS.md``.

    python -m care_q.bench.suite [--suite eval/suite.yaml] [--quick] [--out out/bench]
                                 [--benchmarks eval/BENCHMARKS.md] [--shared ../shared]

Accuracy (``accuracy:``): the trained proxy checkpoint is exported to FP32 ONNX and TFLite,
quantized by `care_q.ptq.ptq` and by every baseline (`care_q.eval.baselines`) on the same
calibration images, then every artifact is evaluated against the FP32 PyTorch model on the same
images (`care_q.eval.evaluate`, artifacts in child processes so a runtime abort is a result).
Latency (``latency:``): each model at deployment resolution with random weights goes through
the same export / ptq / baselines, then `care_q.bench.host.bench` times every int8 artifact
against its FP32 in blocks, a fresh process per block (ratio and spread); the anchors (plain CNNs and
litert-torch's PT2E CARE backbone, `care_q.bench.anchors`) are built and timed alike, same run.
QAT (``qat:``): each QAT recipe fine-tuned on the proxy from its own PTQ start, evaluated on the
same test set, its artifacts verified in their runtimes (`care_q.bench.qat_steps`).
Time budget (``ptq_time:``): the user's `care-q ptq` command in a fresh process and an empty
folder, timed from start to exit.

Every step is cached under ``--out`` with the key it ran with (``<step>.step.json``: its settings,
digests of its inputs and of the care_q code it runs, `care_q.bench.keys`); a killed run resumes
from the last finished step (evaluation even from the last finished artifact), and a changed
setting, input or module reruns only the steps it affects. The final table goes to
``BENCHMARKS.md`` (atomically) and, with plots, to ``--out``/report.{md,json,html}.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console

from care_q.bench.accuracy import run_accuracy
from care_q.bench.benchmarks import SECTIONS, render_benchmarks, summary_lines, write_suite_report
from care_q.bench.issue_targets import issue_checks
from care_q.bench.latency_suite import run_anchors, run_latency
from care_q.bench.npu import npu_coverage
from care_q.bench.ptq_time import run_ptq_time
from care_q.bench.qat_steps import adopt_qat, run_qat
from care_q.bench.schema import SUITE, load_suite
from care_q.bench.steps import Steps
from care_q.bench.targets import method_rows, qat_checks, target_checks, time_checks
from care_q.errors import CareQError
from care_q.paths import EVAL_DIR, REPO_ROOT
from care_q.utils.io import atomic_write_text
from care_q.utils.machine import machine_info


def default_out(quick: bool) -> Path:
    return REPO_ROOT / "out" / ("bench-quick" if quick else "bench")


def run_suite(suite: str | Path = SUITE, *, quick: bool = False, out: str | Path | None = None,
              benchmarks: str | Path | None = None, shared=None, data_root=None, progress: bool | None = None,
              sections=SECTIONS, qat_recipes=None, log=None) -> dict:
    """Run the suite (see the module docstring); returns the combined result. ``qat_recipes``: run only these of
    the suite's QAT recipes (the table names the others as not run)."""
    cfg = load_suite(suite, quick=quick, shared=shared)
    qat_left = []
    if qat_recipes and "qat" in cfg:
        unknown = [n for n in qat_recipes if n not in cfg["qat"]["recipes"]]
        if unknown:
            raise CareQError(f"--qat-recipe {', '.join(unknown)}: not in the suite's qat.recipes {cfg['qat']['recipes']}")
        qat_left = [n for n in cfg["qat"]["recipes"] if n not in qat_recipes]
        cfg["qat"] = {**cfg["qat"], "recipes": [n for n in cfg["qat"]["recipes"] if n in qat_recipes]}
    root = Path(out or default_out(quick))
    root.mkdir(parents=True, exist_ok=True)
    if log is None:
        con = Console(stderr=True, log_path=False)

        def log(msg):
            con.log(msg)

    torch.set_num_threads(cfg["threads"])
    steps = Steps(root, log)
    t0 = time.time()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    A, Lc = cfg["accuracy"], cfg["latency"]
    acc = run_accuracy(cfg, A, root, steps, data_root, progress) if "accuracy" in sections else None
    qt = run_qat(cfg, cfg["qat"], A, root, steps, data_root, progress) if "qat" in sections and "qat" in cfg else {}
    lat = run_latency(cfg, Lc, A, root, steps, data_root, progress) if "latency" in sections else {}
    anchors = run_anchors(cfg, Lc, root, steps, progress, {m: v["bench"] for m, v in lat.items()}) \
        if "latency" in sections else {}
    pt = run_ptq_time(cfg, cfg["ptq_time"], root, steps, data_root) if "ptq_time" in sections and "ptq_time" in cfg else None
    rows = method_rows(acc, lat)
    res = {"command": "suite", "suite": cfg["name"], "source": cfg["source"], "quick": quick, "config": cfg,
           "sections": [s for s in SECTIONS if s in sections], "qat_left_out": qat_left if "qat" in sections else [],
           "started": started, "rows": rows,
           "targets": target_checks(rows, cfg["targets"], A["model"] if acc else None, list(lat))
           + qat_checks(qt, cfg.get("qat") or {}) + time_checks(pt, cfg.get("ptq_time")),
           "accuracy": acc, "ptq_time": pt, "qat": qt, "npu": npu_coverage(acc, qt, A, root),
           "latency": {m: v["bench"] for m, v in lat.items()}, "anchors": anchors,
           "profiles": {m: v.get("profile") for m, v in lat.items()},
           "ort_profiles": {m: v.get("ort_profile") or {} for m, v in lat.items()},
           "npu_latency": {m: v.get("npu") for m, v in lat.items()},
           "steps": steps.timings, "cached_steps": steps.cached, "machine": machine_info(), "seconds": round(time.time() - t0, 1)}
    res["targets"] += issue_checks(res, cfg["targets"])
    paths = write_suite_report(res, root)
    bpath = Path(benchmarks) if benchmarks else (root / "BENCHMARKS.md" if quick else EVAL_DIR / "BENCHMARKS.md")
    atomic_write_text(render_benchmarks(res, report_dir=root), bpath)
    res["written"] = {**{k: str(v) for k, v in paths.items()}, "benchmarks": str(bpath)}
    log(f"wrote {bpath} and {paths['html']} ({res['seconds']} s)")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m care_q.bench.suite", description=__doc__.splitlines()[0])
    p.add_argument("--suite", default=str(SUITE), help="suite definition (default eval/suite.yaml)")
    p.add_argument("--quick", action="store_true", help="the suite's quick: overrides (minutes; validates the pipeline)")
    p.add_argument("--out", help="cache and report folder (default out/bench, out/bench-quick with --quick)")
    p.add_argument("--benchmarks", help="where to write the table (default eval/BENCHMARKS.md; "
                                        "with --quick OUT/BENCHMARKS.md)")
    p.add_argument("--shared", help="the shared folder for ${SHARED} (default $SHARED, else ../shared)")
    p.add_argument("--data-root", help="data root (default $CARE_Q_DATA)")
    p.add_argument("--only", choices=list(SECTIONS), help="run one section")
    p.add_argument("--skip", action="append", default=[], choices=list(SECTIONS), metavar="SECTION",
                   help=f"leave a section out (repeatable; one of {', '.join(SECTIONS)}); the table says so")
    p.add_argument("--adopt-qat", action="append", default=[], metavar="RECIPE=CHECKPOINT",
                   help="seed the QAT step of RECIPE with a run trained elsewhere (e.g. on a GPU) and exit; "
                        "the next bench evaluates, exports and verifies it")
    p.add_argument("--qat-recipe", action="append", default=[], metavar="RECIPE",
                   help="run only this of the suite's QAT recipes (repeatable); the table names the others as not run")
    args = p.parse_args(argv)
    if args.adopt_qat:
        try:
            cfg = load_suite(args.suite, quick=args.quick, shared=args.shared)
            root = Path(args.out or default_out(args.quick))
            for item in args.adopt_qat:
                name, sep, ckpt = item.partition("=")
                if not sep:
                    raise CareQError(f"--adopt-qat {item!r}: expected RECIPE=CHECKPOINT")
                print(f"{name}: {adopt_qat(cfg, root, name, ckpt)}")
        except CareQError as e:
            print(f"make bench: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        res = run_suite(args.suite, quick=args.quick, out=args.out, benchmarks=args.benchmarks, shared=args.shared,
                        data_root=args.data_root,
                        sections=tuple(x for x in ((args.only,) if args.only else SECTIONS) if x not in args.skip),
                        qat_recipes=args.qat_recipe or None)
    except CareQError as e:
        print(f"make bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make bench: interrupted; run it again to resume from the last finished step", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

