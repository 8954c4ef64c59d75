"""`care-q datasets`: the named datasets and calibration sets, and where they resolve."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from care_q.paths import data_root


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "datasets", help="list named datasets / calibration sets and whether they are found",
        description="List the sets defined in care_q/data/sets/*.yaml with their folder under the data root, "
                    "found/missing, and image and class counts (from the file listing).")
    p.add_argument("--data-root", default=None, help="data root (default: $CARE_Q_DATA)")
    return p


def run(args) -> int:
    from care_q.data import inspect_dataset, list_datasets  # imports torch (seconds): only when run

    root = data_root(args.data_root, required=args.data_root is not None)
    table = Table(title=f"datasets (data root: {root if root is not None else 'not set'})")
    for col in ("name", "path", "status", "images", "classes", "description"):
        table.add_column(col, justify="right" if col in ("images", "classes") else "left")
    for d in list_datasets():
        info = inspect_dataset(d, root)
        status = {"found": "[green]found[/]", "missing": "[red]missing[/]",
                  "error": f"[red]error[/]: {info.error}"}.get(info.status, info.status)
        path = str(info.path) if info.path is not None else "-"
        table.add_row(d.name, path, status, "-" if info.images is None else str(info.images),
                      "-" if info.classes is None else str(info.classes), d.description)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    console.print(table)
    if root is None:
        print("no data root: pass --data-root DIR or set CARE_Q_DATA")
    return 0
