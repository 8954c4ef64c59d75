"""The FP32 files `care-q ptq` measures its int8 latency against, exported while it calibrates.

Exporting care_s1@224 to ONNX (torch.export + onnxscript) and TFLite (litert-torch) takes about a
minute and a half of mostly single-threaded Python; calibration keeps both cores busy with
convolutions. So `FP32Baselines.start` exports in a separate process (spawned, one torch thread)
while the int8 work goes on, and `wait` collects the files. A baseline is reused only when its key
file says it was exported from the same weights (hash of the state dict), model, resolution and
exporter versions; anything else is exported again, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from pathlib import Path

import torch

from care_q.errors import CareQError
from care_q.utils.io import atomic_write_json

TARGETS = ("onnx", "tflite")


def _key(net: torch.nn.Module, name: str, size: int) -> dict:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    from importlib.metadata import version

    return {"model": name, "img_size": size, "state_sha256": h.hexdigest(), "torch": torch.__version__,
            "onnxscript": version("onnxscript"), "litert-torch": version("litert-torch")}


def _export_child(net, jobs: list[tuple[str, str]], size: int, conn) -> None:
    try:
        torch.set_num_threads(1)  # the parent's calibration has the cores
        from care_q.export.fp32 import EXPORTERS

        for target, path in jobs:
            EXPORTERS[target](net, path, size)
        conn.send(None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent as text
        conn.send(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


class FP32Baselines:
    """``start`` the FP32 exports in the background, ``wait`` for their paths (target -> Path); as a
    context manager, a run that stops early (an error, Ctrl-C) stops the export too."""

    def __init__(self, net: torch.nn.Module, out: Path, name: str, size: int, targets):
        self.net, self.size = net, size
        self.paths = {t: Path(out) / f"{name}_fp32.{t}" for t in targets if t in TARGETS}
        self.key_path = Path(out) / f"{name}_fp32.key.json"
        self.key = _key(net, name, size)
        self._proc: mp.Process | None = None
        self._conn = None

    def _cached(self) -> bool:
        try:
            return json.loads(self.key_path.read_text()) == self.key and all(p.exists() for p in self.paths.values())
        except (OSError, ValueError):
            return False

    def start(self) -> FP32Baselines:
        if not self.paths or self._cached():
            return self
        self.key_path.unlink(missing_ok=True)  # stale until the new files are complete
        for p in self.paths.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        jobs = [(t, str(p)) for t, p in self.paths.items()]
        self._proc = ctx.Process(target=_export_child, args=(self.net, jobs, self.size, child), daemon=True,
                                 name="care-q FP32 baselines")
        self._proc.start()
        child.close()
        return self

    def wait(self) -> dict[str, Path]:
        if self._proc is not None:
            try:
                err = self._conn.recv()
            except EOFError:
                err = f"the export process exited with code {self._proc.exitcode}"
            self._proc.join()
            self._proc = None
            if err is not None:
                raise CareQError(f"FP32 baseline export for the latency comparison failed: {err}")
            atomic_write_json(self.key, self.key_path)
        return self.paths

    def __enter__(self) -> FP32Baselines:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stop a running export (its files are written atomically: nothing half-written remains)."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._proc = None
