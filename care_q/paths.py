"""Where care-q finds its data files and the data root.

Recipes (``care_q/recipes/*.yaml``) and named dataset definitions (``care_q/data/sets/*.yaml``) are
package data, read through `importlib.resources`: an installed wheel has them, wherever it lies.
``eval/`` (the benchmark suite and its results) exists only in a checkout of the repository.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from care_q.errors import CareQError

PACKAGE_DATA: Traversable = resources.files("care_q")
RECIPES_DIR: Traversable = PACKAGE_DATA / "recipes"
DATASETS_DIR: Traversable = PACKAGE_DATA / "data" / "sets"

REPO_ROOT = Path(__file__).resolve().parents[1]  # a checkout's root (dev-only: eval/, out/)
EVAL_DIR = REPO_ROOT / "eval"


def yaml_files(folder: Traversable) -> list[Traversable]:
    """The ``*.yaml`` files of a folder of package data (or any folder), sorted by name."""
    return sorted((f for f in folder.iterdir() if f.name.endswith(".yaml") and f.is_file()), key=lambda f: f.name)


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
