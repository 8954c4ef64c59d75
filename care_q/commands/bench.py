"""care-q bench: latency (median, p90), size and peak memory of artifacts in their runtimes, with
the ratio to the FP32 artifact of the same runtime and its spread. Each int8 artifact runs against
its FP32 in a process of their own: warm-up, then interleaved rounds in blocks (at least 3); the
spread is the lowest and highest of the blocks' ratios."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("bench", help="latency / size / memory of artifacts on this machine", description=__doc__)
    p.add_argument("--artifacts", required=True, help="folder of .tflite / .onnx files (or one file)")
    p.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    p.add_argument("--runs", type=int, default=60, help="timed rounds per comparison (default 60)")
    p.add_argument("--blocks", type=int, default=3, help="blocks the rounds are split into, at least 3 (default 3)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs per artifact (default 10)")
    p.add_argument("--tflite-delegates", default="xnnpack,builtin",
                   help="comma list of xnnpack, builtin (TFLite's CPU kernels), reference (slow)")
    p.add_argument("--slow-runs", type=int, help="rounds for builtin/reference kernels (default: --runs)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe (and its crash check)")
    p.add_argument("--accuracy-from", metavar="EVAL_DIR",
                   help="a care-q eval output folder (or its report.json): adds the accuracy-drop vs latency plot")
    p.add_argument("--kernel-profile", metavar="JSON",
                   help="instead: time each op of one int8 .tflite (--artifacts) as int8 and as a float island, "
                        "write the profile here (for care-q ptq --recipe ptq_int8_cpu --kernel-profile) and print "
                        "the per-op bound")
    p.add_argument("--ort-profile", metavar="FP32_ONNX",
                   help="instead: onnxruntime's own profiler on one int8 .onnx (--artifacts) and this FP32 .onnx, "
                        "node times by kind side by side, and the bound (each kind in its faster form)")
    p.add_argument("--device", metavar="adb[:SERIAL]",
                   help="with --kernel-profile: time on an Android device over adb instead of this machine")
    p.add_argument("--benchmark-binary", metavar="PATH",
                   help="with --device: TFLite's benchmark_model built for the device")
    p.add_argument("--out", help="output folder for report.md / .json / .html (required unless --kernel-profile "
                                 "or --ort-profile)")
    # On-device benchmarking (--device adb:SERIAL ...) belongs to care_q.device.adb.run_device_bench:
    # register its options here; run() stores its return value under r["device"] before the report
    # is written (care_q.eval.report.device_blocks renders it).
    return p


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from care_q.bench.host import bench
    from care_q.errors import CareQError
    from care_q.eval.report import failure_text

    if args.kernel_profile:
        return _kernel_profile(args)
    if args.ort_profile:
        return _ort_profile(args)
    if args.device or args.benchmark_binary:
        raise CareQError("--device and --benchmark-binary apply to --kernel-profile")
    if not args.out:
        raise CareQError("--out is required (the report's folder)")

    r = bench(args.artifacts, threads=args.threads, runs=args.runs, blocks=args.blocks, warmup=args.warmup,
              tflite_delegates=tuple(d.strip() for d in args.tflite_delegates.split(",") if d.strip()),
              slow_runs=args.slow_runs, memory=not args.no_memory, out=None)
    # r["device"] = run_device_bench(...)   <- the --device options' place (see add_parser)
    from care_q.eval.report import load_peer_report, tradeoff_points, write_report

    if args.accuracy_from:
        r["tradeoff"] = tradeoff_points(load_peer_report(args.accuracy_from, "eval"), r)
    write_report(r, args.out)
    c = Console()
    if not c.is_terminal:
        c = Console(width=140)
    for setting, group in r["latency"].items():
        t = Table(title=f"{setting}: batch 1, {r['threads']} threads, {r['blocks']} blocks of {r['rounds_per_block']} rounds")
        for col in ("artifact", "median ms", "p90 ms", "ratio to FP32", "blocks min-max", "size MB", "peak MB"):
            t.add_column(col, justify="left" if col == "artifact" else "right")
        for n, s in group.items():
            a = r["artifacts"][n]
            sp = s.get("ratio_spread") if "pairs" not in s else None
            t.add_row(n, f"{s['median_ms']:.2f}", f"{s['p90_ms']:.2f}", "" if s["ratio"] is None else f"{s['ratio']:.2f}x",
                      f"{sp[0]:.2f}-{sp[1]:.2f}" if sp else "", f"{a['size_bytes'] / 1e6:.2f}",
                      f"{(a.get('memory') or {}).get('peak_mb', '')}")
        c.print(t)
    failed = {n: a["failure"] for n, a in r["artifacts"].items() if "failure" in a}
    for n, f in failed.items():
        c.print(f"[red]{n}: {failure_text(f)}[/]")
    c.print(f"report: {args.out}/report.md, report.html ({r['seconds']} s)")
    return 1 if failed else 0


def _kernel_profile(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from care_q.bench.kernel_profile import kernel_profile

    s = kernel_profile(args.artifacts, args.kernel_profile, threads=args.threads, runs=args.runs,
                       device=args.device, binary=args.benchmark_binary)
    t = Table(title=f"one-op times on {s['device']}, {s['threads']} threads ({s['ops']} ops, {s['distinct']} distinct)")
    for col in ("op", "type", "ops", "as written ms", "faster form ms", "float island faster"):
        t.add_column(col, justify="left" if col in ("op", "type") else "right")
    for g in s["groups"]:
        t.add_row(g["op"], g["dtype"], str(g["count"]), f"{g['ms']:.3f}", f"{g['best_ms']:.3f}", str(g["float_faster"]))
    c = Console()
    c.print(t)
    c.print(f"sum of one-op times: as written {s['ms']:.2f} ms, each op in its faster form (the bound) "
            f"{s['bound_ms']:.2f} ms; profile: {s['profile']}")
    return 0


def _ort_profile(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from care_q.export.onnx_profile import profile_onnx

    p = profile_onnx(args.artifacts, fp32=args.ort_profile, threads=args.threads, runs=args.runs, warmup=args.warmup,
                     blocks=args.blocks)
    t = Table(title=f"onnxruntime profiler, {p['threads']} threads, median node times over {p['runs']} runs in each of "
                    f"{p['blocks']} blocks per file (the files in turn), by kind")
    for col in ("kind", "int8 nodes", "int8 ms", "FP32 nodes", "FP32 ms", "faster"):
        t.add_column(col, justify="left" if col in ("kind", "faster") else "right")
    for k in p["kinds"]:
        t.add_row(k["kind"], str(k["nodes"]), f"{k['ms']:.3f}", str(k["fp32_nodes"] or "-"),
                  "-" if k["fp32_ms"] is None else f"{k['fp32_ms']:.3f}", k["faster"])
    c = Console()
    c.print(t)
    c.print(f"node sums: int8 {p['ms']:.2f} ms, its bound {p['bound_ms']:.2f} ms, FP32 {p['fp32']['ms']:.2f} ms "
            f"(int8 / FP32 {p['ratio_sum']:.2f}, bound / FP32 {p['ratio_bound']:.2f}); FP32-only kinds: "
            f"{', '.join(p['fp32']['only_fp32']) or 'none'}")
    return 0
