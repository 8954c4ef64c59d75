"""`care-q info`: parameters and MACs of a CARE variant."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="parameters and MACs of a model",
                              description="Parameters and multiply-accumulates (conv, depthwise "
                                          "conv, linear, attention matmuls) for one image.")
    p.add_argument("--model", required=True, help="variant name, e.g. care_s0")
    p.add_argument("--weights", help="checkpoint; sets the class count and the default --img-size")
    p.add_argument("--img-size", type=int, default=None,
                   help="input resolution (default: the checkpoint sidecar's, else 224)")
    return p


def _fmt(n: float) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.2f} M"


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from care_q.errors import CareQError
    from care_q.models import create_model, load_sidecar
    from care_q.transforms.profile import model_info

    img_size = args.img_size or load_sidecar(args.weights).input_size[-1]
    if img_size < 32 or img_size % 32:
        raise CareQError(f"--img-size must be a positive multiple of 32, got {img_size}")
    model = create_model(args.model, weights=args.weights)
    info = model_info(model, img_size=img_size)
    table = Table(title=f"{args.model} @ {img_size}x{img_size}, {info['num_classes']} classes")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("share", justify="right")
    table.add_row("params", _fmt(info["params"]), "")
    table.add_row("params (deploy form)", _fmt(info["deploy_params"]), "")
    table.add_row("MACs", f"{_fmt(info['macs'])} ({info['macs'] / 1e9:.3f} G)", "100%")
    for kind, macs in info["macs_by_type"].items():
        table.add_row(f"  {kind}", _fmt(macs), f"{macs / info['macs']:.1%}")
    Console().print(table)
    return 0
