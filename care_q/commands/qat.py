"""care-q qat: quantization-aware fine-tuning with distillation, exported to int8 .tflite and QDQ .onnx.

Starts from the PTQ calibration of the same recipe; resumable (--resume); data-parallel under
`torchrun --nproc_per_node=K -m care_q qat ...` (--batch-size is the global batch).
"""

from __future__ import annotations

from care_q.commands.common import add_data_root, add_model_args, add_recipe, add_threads


def add_parser(sub):
    p = sub.add_parser("qat", help="quantization-aware training from a checkpoint, then int8 export",
                       description=__doc__)
    add_model_args(p, weights_required=True)
    p.add_argument("--dataset", required=True, help="labelled training set: name or ImageFolder path")
    add_recipe(p, "qat_int8")
    p.add_argument("--epochs", type=float, help="epochs, may be fractional (default: the recipe's qat.epochs)")
    p.add_argument("--max-steps", type=int,
                   help="stop after N steps in all without changing the schedule; continue with --resume")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default: the recipe's qat.lr)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's qat.batch_size)")
    p.add_argument("--checkpoint-every", type=int, help="write OUT/last.pt every N steps (and every epoch)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/last.pt")
    p.add_argument("--calib", help="calibration set for the starting plan (default: --dataset)")
    p.add_argument("--num-calib", type=int, default=1000, help="calibration images (default: 1000)")
    p.add_argument("--eval-dataset", help="report FP32 / PTQ / QAT top-1 on this set")
    p.add_argument("--eval-limit", type=int, help="evaluate on a stratified subset of N images")
    p.add_argument("--num-verify", type=int, default=200, help="held-out images for runtime verification")
    p.add_argument("--target", help="comma list: tflite,onnx (default: the recipe's; none: no export)")
    p.add_argument("--io", choices=["float", "int8"], help="artifact input/output type (default: recipe)")
    p.add_argument("--limit", type=int, help="train on a stratified subset of N images")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes per rank")
    p.add_argument("--seed", type=int, default=0)
    add_data_root(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_threads(p, None, "torch CPU threads per process")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="fail when an artifact's top-1 agreement with the fake-quant model is lower")
    p.add_argument("--out", required=True, help="output folder")
    return p


def run(args) -> int:
    from care_q.commands.common import set_threads
    from care_q.qat import qat

    set_threads(args.threads)
    targets = None
    if args.target is not None:
        targets = [] if args.target == "none" else [t for t in args.target.split(",") if t]
    r = qat(args.model, args.weights, args.dataset, recipe=args.recipe, epochs=args.epochs,
            max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, out=args.out, resume=args.resume,
            calib=args.calib, calib_images=args.num_calib, data_root=args.data_root, seed=args.seed,
            eval_dataset=args.eval_dataset, eval_limit=args.eval_limit, num_verify=args.num_verify,
            targets=targets, io=args.io, img_size=args.img_size, limit=args.limit, workers=args.workers,
            threads=args.threads or 2, checkpoint_every=args.checkpoint_every, min_agreement=args.min_agreement,
            device=args.device)
    if r.get("finished") and "artifacts" in r:
        print(f"report: {args.out}/report.md ({r.get('seconds')} s)")
    return 0
