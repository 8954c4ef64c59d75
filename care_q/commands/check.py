"""`care-q check`: which ops of a .tflite / .onnx artifact run on XNNPACK, NNAPI, the Edge TPU or an
Ethos-U NPU (compiled by Vela), and why."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "check", help="delegate compatibility census of a .tflite / .onnx artifact",
        description="Static census of an artifact: for each target, every op's verdict and the rule that "
                    "decided it, the partitions (delegated subgraphs and CPU islands), the share of MACs on "
                    "the accelerator and, for the Edge TPU, the first unmapped op. The XNNPACK verdict is "
                    "checked against ai-edge-litert on the same file. An Ethos-U target (any Vela "
                    "accelerator config, e.g. ethos-u55-128, ethos-u85-256) is not predicted but compiled by "
                    "Arm's Vela: its verdicts, NPU segments, SRAM / flash use and estimated inference time are "
                    "the compiler's. For .onnx: which QDQ groups "
                    "onnxruntime's CPU EP fuses into integer kernels, read from its optimized graph. "
                    "Exits 1 when the model would fail to load or the XNNPACK census disagrees with the "
                    "runtime.")
    p.add_argument("artifact", type=Path, help=".tflite or .onnx file")
    p.add_argument("--target", action="append", default=None, metavar="TARGET",
                   help="xnnpack | nnapi[:FL] (feature level 1..8, default 8) | edgetpu | all (these three, "
                        "rule-based) | an Ethos-U accelerator config compiled by Vela (ethos-u55-32 .. "
                        "ethos-u85-2048; .tflite only); repeat or comma-separate (default: all)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the full report (every op) as JSON")
    p.add_argument("--ops", action="store_true", help="one table row per op instead of per op type")
    p.add_argument("--no-runtime", action="store_true",
                   help="skip loading the .tflite in ai-edge-litert to confirm the XNNPACK verdict")
    return p


def run(args) -> int:
    from rich.console import Console

    from care_q.census import check
    from care_q.utils.io import atomic_write_json

    console = Console()
    if not console.is_terminal:  # rich assumes 80 columns for pipes and files
        console = Console(width=160)
    targets = ",".join(args.target) if args.target else "all"
    report = check(args.artifact, targets=targets, runtime=not args.no_runtime)
    report.render(console, all_ops=args.ops)
    if args.json:
        atomic_write_json(report.to_dict(), args.json)
        console.print(f"report: {args.json}")
    failed = any(t.fatal or (t.runtime is not None and not t.runtime.get("match", True))
                 for t in report.targets.values())
    return 1 if failed else 0
