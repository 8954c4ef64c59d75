"""Atomic file writes: write to a temporary name in the same folder, then rename.

An interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path

from care_q.errors import CareQError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name carries the writer's pid (``.NAME.PID.XXXX.tmp``): leftovers of a writer
    that was killed (-9, so no cleanup ran) are removed the next time ``path`` is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; final files follow the umask like open()
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temps(path: Path) -> list[Path]:
    """Remove ``.NAME.PID.*.tmp`` files next to ``path`` whose writer process is gone."""
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(obj, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", path)


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer, np.bool_)):  # numpy scalars, comparisons' np.bool_ included
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_resume_state(path: str | Path, config: dict, keys, out: str | Path, normalize=None) -> dict:
    """The checkpoint ``path`` of a run in ``out`` that ``--resume`` continues, checked: it exists,
    loads (weights only), and was started with the same ``config`` values for ``keys``
    (``normalize(key, value)``, when given, maps both sides first: older checkpoints' forms)."""
    import torch


    path = Path(path)
    if not path.exists():
        raise CareQError(f"--resume: no {path} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CareQError(f"--resume: {path} could not be read ({str(e).splitlines()[0]})") from None
    saved = state.get("config", {})
    norm = normalize or (lambda key, value: value)
    diff = [f"{k}: {saved.get(k)!r} in {path.name}, {config[k]!r} now" for k in keys
            if norm(k, saved.get(k)) != norm(k, config[k])]
    if diff:
        raise CareQError(f"--resume: the run in {out} was started with other settings (" + "; ".join(diff) + ")")
    return state
