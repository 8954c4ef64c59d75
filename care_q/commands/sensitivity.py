"""care-q sensitivity: per-tensor SQNR and the accuracy effect of quantizing one layer group at a
time (or all but one), ranked: what to keep in higher precision."""

from __future__ import annotations

from care_q.commands.common import add_data_root, add_model_args, add_recipe, add_threads


def add_parser(sub):
    p = sub.add_parser("sensitivity", help="rank layers by the damage their int8 quantization does",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--calib", default="imagenet_1k_subset", help="calibration set name or ImageFolder path")
    add_data_root(p)
    add_recipe(p, "ptq_int8")
    p.add_argument("--num-calib", type=int, help="calibration images (default: the whole set)")
    p.add_argument("--num-eval", type=int, default=256, help="held-out images to score on (default 256)")
    p.add_argument("--eval-set", help="labelled set to score on (default: held-out images of --calib)")
    p.add_argument("--by", default="block", choices=["block", "stage", "role"],
                   help="layer groups: blocks, stages, or tensor roles (as recipes name them)")
    p.add_argument("--modes", default="only,all_but", help="comma list of only, all_but (default both)")
    add_threads(p, what="torch threads")
    p.add_argument("--top", type=int, default=15, help="rows to print (all are in the report)")
    p.add_argument("--out", default="out/sensitivity", help="output folder (default out/sensitivity)")
    return p


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from care_q.eval.report import pct
    from care_q.eval.sensitivity import sensitivity

    torch.set_num_threads(args.threads)
    r = sensitivity(args.model, weights=args.weights, calib=args.calib, recipe=args.recipe, num_calib=args.num_calib,
                    num_eval=args.num_eval, eval_set=args.eval_set, data_root=args.data_root, img_size=args.img_size,
                    by=args.by, modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), out=args.out)
    c = Console()
    if not c.is_terminal:
        c = Console(width=140)
    full = r["full_int8"]
    t = Table(title=f"{args.model}: layer sensitivity ({r['by']}), all int8: agreement {pct(full['agreement'])}, "
                    f"logit SQNR {full['logit_sqnr_db']:.1f} dB")
    for col in ("#", "group", "tensors", "only: agree", "only: SQNR dB", "all but: agree", "mean tensor SQNR", "worst tensor"):
        t.add_column(col, justify="left" if col in ("group", "worst tensor") else "right")
    for i, g in enumerate(r["ranking"][:args.top], 1):
        row = r["groups"][g]
        o, a = row.get("only", {}), row.get("all_but", {})
        t.add_row(str(i), g, str(row["tensors"]), pct(o.get("agreement"), 1),
                  f"{o['logit_sqnr_db']:.1f}" if "logit_sqnr_db" in o else "", pct(a.get("agreement"), 1),
                  f"{row['sqnr_db_mean']:.1f}" if row.get("sqnr_db_mean") is not None else "", str(row["worst_tensor"]))
    c.print(t)
    c.print(f"report: {args.out}/report.md, report.json, report.html ({r['seconds']} s)")
    return 0
