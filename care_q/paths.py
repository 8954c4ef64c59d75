"""Where care-q finds its data files and the data root."""

from __future__ import annotations

import os
from pathlib import Path

from care_q.errors import CareQError

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
CALIBRATION_DIR = REPO_ROOT / "calibration"
EVAL_DIR = REPO_ROOT / "eval"


def data_root(explicit: str | os.PathLike | None = None, required: bool = True) -> Path | None:
    """`--data-root`, else `$CARE_Q_DATA`; a clear error when neither names a folder."""
    value = explicit if explicit is not None else os.environ.get("CARE_Q_DATA")
    if value is None:
        if required:
            raise CareQError("no data root: pass --data-root DIR or set CARE_Q_DATA")
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        if required:
            src = "--data-root" if explicit is not None else "CARE_Q_DATA"
            raise CareQError(f"data root {root} ({src}) is not a folder")
        return None
    return root
