"""`care-q export`: FP32 ONNX / TFLite artifacts of the deploy form, verified against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="FP32 ONNX / TFLite export, verified",
                              description="Export the FP32 deploy form to ONNX and/or TFLite and run "
                                          "each artifact in its runtime against PyTorch. Exits 1 "
                                          "when an artifact disagrees.")
    p.add_argument("--model", required=True, help="variant name, e.g. care_s0")
    p.add_argument("--weights", help="checkpoint (official format); without it, random init")
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution (default: the checkpoint sidecar's, else 224)")
    p.add_argument("--format", choices=["onnx", "tflite", "all"], default="all")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--name", help="artifact base name (default: the checkpoint's stem, else --model); "
                                  "files are <name>_fp32.onnx / .tflite")
    p.add_argument("--samples", type=int, default=8, help="random inputs to verify on (default 8)")
    p.add_argument("--threads", type=int, default=2, help="runtime threads for verification")
    p.add_argument("--no-verify", action="store_true", help="skip the runtime check")
    return p


def run(args) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from care_q.errors import CareQError
    from care_q.export.fp32 import FORMATS, REL_TOL, export_fp32
    from care_q.models import create_model, load_sidecar

    if args.samples < 1:
        raise CareQError(f"--samples must be >= 1, got {args.samples}")
    out, err = Console(), Console(stderr=True, log_path=False)
    if not out.is_terminal:  # rich assumes 80 columns for pipes and files; keep rows on one line
        out = Console(width=120)
    img_size = args.img_size or load_sidecar(args.weights).input_size[-1]
    name = args.name or (Path(args.weights).stem if args.weights else args.model)
    formats = FORMATS if args.format == "all" else (args.format,)
    model = create_model(args.model, weights=args.weights)
    t0 = time.perf_counter()
    with err.status(f"exporting {name} at {img_size}x{img_size}") as status:
        def progress(msg: str) -> None:
            status.update(f"{msg} [dim]({time.perf_counter() - t0:.0f} s)[/dim]")
            err.log(msg)

        res = export_fp32(model, args.out, name, img_size, formats=formats, verify=not args.no_verify,
                          num_samples=args.samples, threads=args.threads, progress=progress)

    table = Table(title=f"{name} FP32 @ {img_size}x{img_size} in {args.out}, vs PyTorch on "
                        f"{args.samples} inputs (limits: rel diff <= {REL_TOL:.0e}, top-1 100%)")
    for col in ("artifact", "size MB", "max abs diff", "rel diff", "top-1 agree", "XNNPACK partitions",
                "ok"):
        table.add_column(col, justify="left" if col == "artifact" else "right",
                         overflow="fold" if col == "artifact" else "ellipsis")
    for a in res["artifacts"].values():
        v = a["verify"]
        parts = a.get("xnnpack_partitions")
        ok = "-" if v is None else ("[green]yes[/green]" if v["ok"] else "[red]NO[/red]")
        table.add_row(Path(a["path"]).name, f"{a['size_mb']:.2f}",
                      "-" if v is None else f"{v['max_abs_diff']:.2e}",
                      "-" if v is None else f"{v['rel_diff']:.2e}",
                      "-" if v is None else f"{v['top1_agreement']:.0%}",
                      "-" if parts is None else str(parts), ok)
    out.print(table)
    tfl = res["artifacts"].get("tflite")
    if tfl and tfl["delegate_info"]["undelegated_ops"]:
        di = tfl["delegate_info"]
        ops = ", ".join(f"{k} x{v}" for k, v in di["undelegated_ops"].items())
        out.print(f"XNNPACK took {di['delegated_nodes']} of {di['total_nodes']} ops; "
                  f"left on the CPU kernels: {ops}")
    for problem in res["problems"]:
        err.print(f"[red]error:[/red] {problem}")
    return 0 if res["ok"] else 1
