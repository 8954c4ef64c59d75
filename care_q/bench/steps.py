"""The suite's resumable step cache: ``<root>/<step>.step.json`` holds the key a step ran with,
its result and how long it took; a step whose key is unchanged is not run again, and a step
killed before its marker was written resumes in its folder (tagged with the key it ran under)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from care_q.utils.io import atomic_write_json


def as_json(config: dict) -> dict:
    """``config`` as it reads back from JSON (what a marker or a folder tag is compared with)."""
    return json.loads(json.dumps(config, default=str))


class Steps:
    """Cached steps: ``run(key, config, fn, folder)`` returns the cached result when the step
    finished before with the same config; otherwise wipes ``folder`` if it holds another
    config's partial work, runs ``fn`` and records the result."""

    def __init__(self, root: Path, log):
        self.root = root
        self.log = log
        self.timings: dict[str, float] = {}   # step -> seconds it took when it ran
        self.cached: list[str] = []           # steps reused from an earlier invocation

    @staticmethod
    def prepare(folder: Path, config: dict, clear: bool = False) -> None:
        """Tag ``folder`` with a step's configuration; a folder tagged otherwise (or ``clear``)
        starts empty, so a changed step never resumes another configuration's partial work."""
        cfg = as_json(config)
        tag = folder / ".step-config.json"
        if folder.exists() and (clear or not tag.exists() or json.loads(tag.read_text() or "{}") != cfg):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg, tag)

    def run(self, key: str, config: dict, fn, folder: Path | None = None, tag: dict | None = None):
        """``tag`` (default ``config``) is what ``folder`` is tagged with: a config change outside
        the tag re-runs ``fn`` on the folder's work instead of wiping it."""
        marker = self.root / f"{key}.step.json"
        cfg = as_json(config)
        if marker.exists():
            try:
                saved = json.loads(marker.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("config") == cfg:
                self.log(f"[dim]{key}: cached ({saved.get('seconds', '?')} s when run)[/]")
                self.timings[key] = float(saved.get("seconds") or 0.0)
                self.cached.append(key)
                return saved["result"]
        if folder is not None:
            self.prepare(folder, cfg if tag is None else tag)
        self.log(f"{key}: running")
        t0 = time.time()
        result = fn()
        seconds = round(time.time() - t0, 1)
        self.timings[key] = seconds
        atomic_write_json({"config": cfg, "result": result, "seconds": seconds}, marker)
        self.log(f"{key}: done in {seconds} s")
        return result
