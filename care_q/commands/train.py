"""`care-q train`: train a CARE model in FP32 from scratch (see care_q/train.py)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a CARE model in FP32 (AdamW, cosine schedule, label smoothing)",
        description="Train a CARE model from scratch on a named dataset or an ImageFolder path; writes "
                    "OUT/<model>_<dataset>_<size>.pth (+ .json sidecar), OUT/last.pt and OUT/train_log.txt.")
    p.add_argument("--model", default="care_s0", help="model name (default: care_s0)")
    p.add_argument("--dataset", default="cifar10_train", help="named set or ImageFolder path")
    p.add_argument("--img-size", type=int, default=64, help="input size in pixels (default: 64)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps (default: 5%% of all steps, at most one epoch)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/last.pt")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps in all (the schedule still spans --epochs)")
    p.add_argument("--save-every", type=int, default=200, help="write OUT/last.pt every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-dataset", default=None, help="report top-1 on this set after every epoch")
    p.add_argument("--limit", type=int, default=None, help="train on a stratified subset of N images")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on a subset of N images")
    p.add_argument("--data-root", default=None, help="data root (default: $CARE_Q_DATA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    return p


def run(args) -> int:
    from care_q.commands.common import set_threads
    from care_q.train import train

    set_threads(args.threads)

    res = train(model=args.model, dataset=args.dataset, img_size=args.img_size, epochs=args.epochs,
                out=args.out, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                workers=args.workers, resume=args.resume, max_steps=args.max_steps, seed=args.seed,
                eval_dataset=args.eval_dataset, data_root=args.data_root,
                label_smoothing=args.label_smoothing, warmup_steps=args.warmup_steps,
                save_every=args.save_every, limit=args.limit, eval_limit=args.eval_limit)
    rate = f", {res.images_per_s:.1f} img/s" if res.images_per_s else ""
    state = "done" if res.finished else "stopped"
    print(f"{state}: step {res.step}/{res.total_steps}{rate}; checkpoint {res.checkpoint}")
    return 0
