"""`care-q` command line: a thin layer over the Python API.

Each subcommand lives in `care_q/commands/<name>.py` with `add_parser(subparsers)` and
`run(args) -> int`. A `CareQError` is printed as one line (no traceback), exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from care_q.errors import CareQError

COMMANDS = ["info", "datasets", "train", "export", "recipes", "ptq", "qat", "eval", "bench",
            "sensitivity", "check"]


def build_parser() -> argparse.ArgumentParser:
    from care_q import __version__

    parser = argparse.ArgumentParser(prog="care-q", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"care-q {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"care_q.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"care_q.commands.{name}":
                continue  # command not built yet
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CareQError as e:
        print(f"care-q {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"care-q {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
