"""Progress on stderr: a bar for counted work (`progress_bar`, `track`), a spinner for a step
(`stage`). Shown when stderr is a terminal, or when ``enabled=True``; silent otherwise.

    with progress_bar("calibrate", total=n) as advance:
        for x in batches:
            ...
            advance(x.shape[0], loss=1.23)     # extra fields are shown after the bar
    for x, y in track(loader, "eval"):         # a bar over any iterable (total from len())
        ...
    with stage("writing m.tflite"):            # spinner, then "done writing m.tflite (1.2 s)"
        ...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[..., None]


def _console() -> Console:
    return Console(stderr=True)


def _silent(n: int = 1, **fields) -> None:
    """The ``advance`` of a disabled bar."""


def _describe(fields: dict) -> str:
    """``loss 1.23 lr 0.001``: the extra fields shown after a bar."""
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, enabled: bool | None = None) -> Iterator[Advance]:
    """Yield ``advance(n, **fields)``; a rich bar on stderr when it is a terminal (or ``enabled``).

    Extra fields are shown after the bar (e.g. ``loss=1.23``).
    """
    console = _console()
    if enabled is None:
        enabled = console.is_terminal
    if not enabled:
        yield _silent
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=True) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n=1, **fields):
            prog.update(task, advance=n, **({"info": _describe(fields)} if fields else {}))

        yield advance


@contextlib.contextmanager
def stage(description: str, enabled: bool | None = None) -> Iterator[None]:
    """A step without a count (an export, a verification): a spinner on stderr while it runs and,
    when it is done, one line with its time; nothing when stderr is not a terminal (or not ``enabled``)."""
    console = _console()
    if enabled is None:
        enabled = console.is_terminal
    if not enabled:
        yield
        return
    t0 = time.time()
    with console.status(description):
        yield
    console.print(f"[green]done[/] {description} ({time.time() - t0:.1f} s)", highlight=False)


def track(iterable: Iterable, description: str, total: int | None = None,
          enabled: bool | None = None) -> Iterator:
    """Iterate with a progress bar (see `progress_bar`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress_bar(description, total, enabled) as advance:
        for item in iterable:
            yield item
            advance(1)
