"""`care-q` command line: a thin layer over the Python API.

Each subcommand lives in `care_q/commands/<name>.py` with `add_parser(subparsers)` and
`run(args) -> int`. A `CareQError` is printed as one line (no traceback), exit code 2. While a
command runs, a warning is printed as one line, ``care-q <command>: warning: <message>``, without
Python's file, line and source line; `main` restores the previous `warnings.showwarning` when it
returns, so importing or calling it leaves no global change behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator

from care_q.errors import CareQError
from care_q.version import __version__

COMMANDS = ["info", "datasets", "train", "export", "recipes", "ptq", "qat", "eval", "bench",
            "sensitivity", "check"]


def build_parser() -> argparse.ArgumentParser:
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


def warning_line(command: str, message: Warning | str) -> str:
    """A warning as the CLI prints it: one line (a multi-line message is joined with "; ")."""
    text = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return f"care-q {command}: warning: {text}"


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Print warnings as `warning_line` on stderr while the block runs; restore the previous hook after."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(warning_line(command, message), file=file if file is not None else sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with one_line_warnings(args.command):
            return int(args._run(args) or 0)
    except CareQError as e:
        print(f"care-q {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"care-q {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
