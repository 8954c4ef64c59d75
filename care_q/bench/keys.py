"""Cache keys of the suite's steps: content digests of the code a step runs and of its inputs.

A step's key (`care_q.bench.steps.Steps`) holds its settings, a digest of each input it reads
(weights and artifacts by their bytes, recipes and dataset definitions by their content, never by
path or modification time) and ``code_digest(kind)``: a SHA-256 over the source of the care_q
modules the step runs. Those are ``STEP_CODE[kind]``'s roots and every care_q module they
import, found by reading the source (imports at any level, and module names spelled as strings,
as `importlib.import_module` takes them); a package whose submodule is imported adds its
``__init__.py`` too, but not what that file imports. Editing a module re-runs exactly the steps
whose code reaches it; a refactoring that keeps the behaviour re-runs them too (the digest
cannot know), which is the price of never reusing a result the code no longer gives.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path

import care_q
from care_q.data.datasets import get_definition
from care_q.errors import CareQError
from care_q.quant.recipe import load_recipe

PACKAGE_DIR = Path(care_q.__file__).resolve().parent
ROOT_PACKAGE = "care_q"

# step kind -> (the modules whose functions the step calls, subpackages left out of the closure).
# QAT's training key leaves out the exporters, their verification and the evaluation: a change
# there re-exports and re-verifies a finished run (the "qat" kind) without training it again.
AFTER_TRAINING = ("care_q.export", "care_q.census", "care_q.eval", "care_q.runtime", "care_q.device")
STEP_CODE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "weights": (("care_q.models",), ()),
    "fp32": (("care_q.export.fp32", "care_q.models"), ()),
    "ptq": (("care_q.ptq",), ()),
    "baselines": (("care_q.eval.baselines",), ()),
    "aimet": (("care_q.eval.aimet_adaround",), ()),
    "eval": (("care_q.eval.evaluate",), ()),
    "analysis": (("care_q.eval.analysis",), ()),
    "ceiling": (("care_q.eval.ceiling", "care_q.pipeline.prepare"), ()),
    "bench": (("care_q.bench.host",), ()),
    "anchors": (("care_q.bench.anchors",), ()),
    "profile": (("care_q.export.tflite_profile",), ()),
    "ort_profile": (("care_q.export.onnx_profile",), ()),
    "npu": (("care_q.bench.npu",), ()),
    "qat_train": (("care_q.qat",), AFTER_TRAINING),
    "qat": (("care_q.qat",), ()),
}

_MODULE_NAME = re.compile(r"care_q(\.\w+)+")


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of care_q module ``name`` (a package: its ``__init__.py``), or None."""
    parts = name.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for f in (base / "__init__.py", base.with_suffix(".py") if parts else None):
        if f is not None and f.is_file():
            return f
    return None


def _package_of(name: str, f: Path) -> str:
    return name if f.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(name: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The care_q modules that module ``name``'s source imports (anywhere in it)."""
    f = module_file(name, package_dir)
    tree = ast.parse(f.read_bytes(), filename=str(f))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package_of(name, f).split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                found.add(sub if module_file(sub, package_dir) else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
    return {m for m in found if m.split(".")[0] == ROOT_PACKAGE and module_file(m, package_dir)}


def closure(roots, exclude=(), package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The source files of ``roots`` and every care_q module they import, transitively (not
    those under ``exclude``), with the ``__init__.py`` of each package on the way; sorted."""
    excluded = [e.split(".") for e in exclude]

    def skip(m: str) -> bool:
        parts = m.split(".")
        return any(parts[:len(e)] == e for e in excluded)

    todo = list(roots)
    for r in roots:
        if module_file(r, package_dir) is None:
            raise CareQError(f"bench cache keys: no module {r} under {package_dir} (care_q/bench/keys.py STEP_CODE)")
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen or skip(m):
            continue
        seen.add(m)
        todo.extend(imported_modules(m, package_dir))
    files = {module_file(m, package_dir) for m in seen}
    for m in seen:  # the packages a module sits in run their __init__.py first
        parts = m.split(".")
        files.update(module_file(".".join(parts[:i]), package_dir) for i in range(1, len(parts)))
    return sorted(files)


def digest_files(files, package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over each file's path inside the package and its bytes (in the order given)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(package_dir).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def code_digest(kind: str, package_dir: Path = PACKAGE_DIR) -> str:
    """The digest of the code that a step of ``kind`` (a key of `STEP_CODE`) runs."""
    roots, exclude = STEP_CODE[kind]
    return digest_files(closure(roots, exclude, package_dir), package_dir)


def package_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """The digest of all of care_q: its source and its package data (recipes, dataset definitions)."""
    files = sorted(f for f in package_dir.rglob("*") if f.suffix in (".py", ".yaml") and f.is_file()
                   and "__pycache__" not in f.parts)
    return digest_files(files, package_dir)


def json_digest(value) -> str:
    """SHA-256 of a JSON-able value, independent of its mappings' order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def recipe_content(name: str) -> dict:
    """A recipe's settings as a key: its content, not the file it was read from."""
    return without_source(load_recipe(name).to_json())


def without_source(content: dict) -> dict:
    return {k: v for k, v in content.items() if k != "source"}


def dataset_key(name: str) -> dict:
    """A named set by its definition's content (a path to a folder: by that path)."""
    defn = get_definition(name)
    if defn is None:
        return {"name": name}
    return {"name": name, "definition": json_digest(without_source(asdict(defn)))}


def file_key(path) -> dict | None:
    """An input file by its bytes: size and SHA-256 (a copy of the same bytes, elsewhere or with
    a new modification time, keeps the key; the shared proxy checkpoint is copied afresh each
    time shared/ is provisioned)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CareQError(f"file not found: {p}")
    st = p.stat()
    return {"size": st.st_size, "sha256": _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)}


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, computed once per process for the same path, size and mtime."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
