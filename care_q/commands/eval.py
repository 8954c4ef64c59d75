"""care-q eval: accuracy of the FP32 model and of every artifact in a folder, on the same images."""

from __future__ import annotations

from care_q.commands.common import add_data_root, add_model_args, add_threads


def add_parser(sub):
    p = sub.add_parser("eval", help="top-1/top-5, agreement with FP32 and accuracy drop of every artifact",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--artifacts", required=True, help="folder of .tflite / .onnx files (or one file)")
    p.add_argument("--dataset", required=True, help="labelled dataset name (care-q datasets) or ImageFolder path")
    add_data_root(p)
    p.add_argument("--limit", type=int, help="a stratified, seeded subset of N images (default: all)")
    add_threads(p, what="runtime threads")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch where the runtime allows")
    p.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    p.add_argument("--tflite-delegate", default="xnnpack", choices=["xnnpack", "builtin", "reference"])
    p.add_argument("--calib", help="also calibrate on this set and add per-tensor SQNR and attention "
                                   "histograms to the report")
    p.add_argument("--recipe", default="ptq_int8", help="recipe for --calib (default ptq_int8)")
    p.add_argument("--num-calib", type=int, default=256, help="images for --calib (default 256)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run artifacts in this process (faster start; a runtime abort then ends care-q)")
    p.add_argument("--no-cache", action="store_true", help="do not reuse predictions cached under OUT/.cache")
    p.add_argument("--latency-from", metavar="BENCH_DIR",
                   help="a care-q bench output folder (or its report.json): adds the accuracy-drop vs latency plot")
    p.add_argument("--out", required=True, help="output folder for report.md / .json / .html")
    return p


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from care_q.eval.evaluate import evaluate
    from care_q.eval.report import failure_text, pct, pts

    torch.set_num_threads(args.threads)
    analysis = None
    if args.calib:
        from care_q.eval.analysis import prepare_plan, quant_analysis

        prep = prepare_plan(args.model, weights=args.weights, calib=args.calib, recipe=args.recipe,
                            num_calib=args.num_calib, img_size=args.img_size, data_root=args.data_root)
        analysis = quant_analysis(prep, data_root=args.data_root)
    r = evaluate(args.model, weights=args.weights, artifacts=args.artifacts, dataset=args.dataset,
                 data_root=args.data_root, limit=args.limit, img_size=args.img_size, out=args.out,
                 threads=args.threads, batch_size=args.batch_size, seed=args.seed, isolate=not args.no_isolate,
                 tflite_delegate=args.tflite_delegate, cache=not args.no_cache, analysis=analysis, report=False)
    from care_q.eval.report import load_peer_report, tradeoff_points, write_report

    if args.latency_from:
        r["tradeoff"] = tradeoff_points(r, load_peer_report(args.latency_from, "bench"))
    write_report(r, args.out)
    c = Console()
    if not c.is_terminal:
        c = Console(width=140)
    ref = r["reference"]
    t = Table(title=f"{args.model} on {r['dataset']['name']} ({r['dataset']['images']} images, "
                    f"{r['img_size']}x{r['img_size']})")
    for col in ("model / artifact", "top-1", "top-5", "drop (pt)", "agreement", "status"):
        t.add_column(col, justify="left" if col in ("model / artifact", "status") else "right")
    t.add_row("PyTorch FP32", pct(ref["top1"]), pct(ref["top5"]), "", "", "reference")
    failed = 0
    for name, a in r["artifacts"].items():
        if "failure" in a:
            failed += 1
            t.add_row(name, "", "", "", "", f"[red]{failure_text(a['failure'])}[/]")
            continue
        m = a["metrics"]
        t.add_row(name, pct(m["top1"]), pct(m["top5"]), pts(m["drop_top1_pt"]), pct(m["agreement"]), "ok")
    c.print(t)
    c.print(f"report: {args.out}/report.md, report.html ({r['seconds']} s)")
    return 1 if failed else 0
