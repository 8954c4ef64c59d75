"""The FP32 files `care-q ptq` measures its int8 latency against, reused only when they match.

Exporting care_s1@224 to ONNX (torch.export + onnxscript) and TFLite (litert-torch) takes about
a minute (side by side, see `_OnnxChild`), so a second run into the same folder (another recipe,
say) reuses the files, but only when their key file says they were exported from the same weights
(hash of the state dict), model, resolution and exporter versions; anything else is exported
again, never silently reused. The ONNX file is exported at a fixed batch of 1, what the latency runs use: half the
export time of a dynamic batch (22 s against 43 s for care_s1@224) for the same latency (50.0
against 50.4 ms, interleaved). (Exporting in a background process while calibration runs was
measured and dropped: on 2 cores calibration's convolutions already use both, so the total did
not change.)
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import torch

from care_q.errors import CareQError
from care_q.utils.io import atomic_write_json


def baseline_key(net: torch.nn.Module, name: str, size: int) -> dict:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return {"model": name, "img_size": size, "state_sha256": h.hexdigest(), "torch": torch.__version__,
            "onnxscript": version("onnxscript"), "litert-torch": version("litert-torch"), "batch": 1}


def fp32_baselines(net: torch.nn.Module, out: str | Path, name: str, size: int, targets) -> dict[str, Path]:
    """``{target: out/<name>_fp32.<target>}`` for `targets` (onnx, tflite): reused where the key file
    ``out/<name>_fp32.key.json`` matches this model, else exported (atomically) and the key written."""
    from care_q.export.fp32 import EXPORTERS

    out = Path(out)
    paths = {t: out / f"{name}_fp32.{t}" for t in targets}
    key_path = out / f"{name}_fp32.key.json"
    key = baseline_key(net, name, size)
    try:
        stored = json.loads(key_path.read_text())
    except (OSError, ValueError):
        stored = {}
    exported = stored.pop("targets", [])
    done = set(exported) if stored == key else set()
    if not done:
        key_path.unlink(missing_ok=True)  # nothing present is valid for this model
    todo = [t for t, p in paths.items() if t not in done or not p.exists()]
    child = None
    if "onnx" in todo and len(todo) > 1:  # the ONNX export in a second process, beside the TFLite one
        child = _OnnxChild(net, paths["onnx"], size)
        todo.remove("onnx")
    try:
        for t in todo:
            EXPORTERS[t](net, paths[t], size, **({"dynamic_batch": False} if t == "onnx" else {}))
            done.add(t)
            atomic_write_json({**key, "targets": sorted(done)}, key_path)
    except BaseException:
        if child is not None:
            child.kill()
        raise
    if child is not None:
        child.wait()  # raises CareQError if it failed
        done.add("onnx")
        atomic_write_json({**key, "targets": sorted(done)}, key_path)
    return paths


class _OnnxChild:
    """`export_onnx(net, path, size, dynamic_batch=False)` in a child process. Both exporters trace
    in Python on one core for most of their time; side by side, care_s1@224's two FP32 files take
    55 s instead of 67-74 s one after the other (measured on 2 cores)."""

    def __init__(self, net: torch.nn.Module, path: Path, size: int):
        import subprocess
        import sys
        import tempfile

        self.path = path
        fd, self.model_file = tempfile.mkstemp(suffix=".pt", prefix=".care-q-fp32-")
        with open(fd, "wb") as f:
            torch.save(net, f)  # the whole module (our own temporary file, read back below)
        # its stderr to a file, not a pipe: a pipe read only at the end would stall a chatty child
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "care_q.export.fp32_baselines", self.model_file,
                                     str(path), str(size)], stdout=subprocess.DEVNULL, stderr=self.log)

    def _cleanup(self) -> str:
        self.proc.wait()
        Path(self.model_file).unlink(missing_ok=True)
        self.log.seek(0)
        err = self.log.read().decode(errors="replace")
        self.log.close()
        return err

    def kill(self) -> None:
        self.proc.kill()
        self._cleanup()

    def wait(self) -> None:
        err = self._cleanup()
        if self.proc.returncode != 0:
            lines = err.strip().splitlines() or [f"exit code {self.proc.returncode}"]
            raise CareQError(f"FP32 ONNX export of {self.path.name} (child process) failed: {lines[-1][:300]}")


def _child_main(argv: list[str]) -> int:
    from care_q.export.fp32 import export_onnx

    model_file, path, size = argv
    torch.set_num_threads(1)
    net = torch.load(model_file, weights_only=False).eval()
    export_onnx(net, Path(path), int(size), dynamic_batch=False)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_child_main(sys.argv[1:]))
