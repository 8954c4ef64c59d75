"""Run one artifact over an evaluation set, in this process or in a child process.

`evaluate` runs every artifact through `run_artifact`. With ``isolate=True`` it does so in a
child (``python -m care_q.eval.worker SPEC.json``) so that a runtime that aborts (TFLite's int8
DIV kernel calls abort() on a divisor equal to its zero point) takes only the child down and is
reported as a failure. The child reloads the same seeded selection of images, checks that its
labels match the reference's, and writes its predictions to an .npz (atomically); progress goes
to stdout as ``P <images>`` lines that the parent turns into its progress bar.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from care_q.errors import CareQError
from care_q.eval.metrics import Tally
from care_q.runtime import load_runner
from care_q.utils.io import atomic_path

PREPROCESS_FIELDS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def preprocess_to_dict(pre) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in
            ((f, getattr(pre, f)) for f in PREPROCESS_FIELDS)}


def preprocess_from_dict(d: dict):
    from care_q.models import PreprocessConfig  # slow import (timm)

    return PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_images(spec: dict):
    """The evaluation set of a spec (same seed and limit: the same images, in the same order)."""
    from care_q.data import get_dataset, make_loader  # slow import (torchvision, timm)

    ds = get_dataset(spec["dataset"], preprocess_from_dict(spec["preprocess"]), data_root=spec.get("data_root"),
                     limit=spec.get("limit"), seed=spec.get("seed", 0), progress=False)
    return ds, make_loader(ds, batch_size=spec.get("batch_size", 64), shuffle=False, workers=0)


def run_artifact(spec: dict, advance: Callable[[int], None] | None = None) -> dict:
    """Predictions of the artifact ``spec['path']`` on the spec's images, against the reference
    logits in ``spec['ref']`` (.npz with ``logits`` and ``labels``). Writes ``spec['out']``
    (.npz: ``top``, ``conf``, ``signal``, ``noise``, ``seconds``) and returns its contents."""
    ref = np.load(spec["ref"])
    ref_logits, ref_labels = ref["logits"], ref["labels"]
    runner = load_runner(spec["path"], threads=spec.get("threads", 2),
                         tflite_delegate=spec.get("tflite_delegate", "xnnpack"))
    _, loader = load_images(spec)
    tally = Tally()
    seen = 0
    t0 = time.perf_counter()
    for x, y in loader:
        n = x.shape[0]
        if not np.array_equal(y.numpy(), ref_labels[seen:seen + n]):
            raise CareQError(f"{spec['path']}: the evaluation images differ from the reference run's "
                             f"(labels differ in images {seen}..{seen + n}); the data changed under the run")
        logits = runner(x.numpy(), max_batch=spec.get("batch_size", 64))
        if logits.shape[1] != ref_logits.shape[1]:
            raise CareQError(f"artifact {Path(spec['path']).name} outputs {logits.shape[1]} classes but the "
                             f"model's head has {ref_logits.shape[1]}")
        tally.update(logits, ref_logits[seen:seen + n])
        seen += n
        if advance:
            advance(n)
    if seen != len(ref_labels):
        raise CareQError(f"{spec['path']}: saw {seen} images, the reference run saw {len(ref_labels)}")
    res = {"top": tally.top, "conf": tally.conf, "signal": np.float64(tally.signal),
           "noise": np.float64(tally.noise), "seconds": np.float64(time.perf_counter() - t0)}
    save_npz(Path(spec["out"]), **res)
    return res


def save_npz(path: Path, **arrays) -> None:
    """``np.savez`` to ``path``, atomically (an interrupted run leaves no partial cache entry)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_isolated(spec: dict, advance: Callable[[int], None] | None = None,
                 timeout: float | None = None) -> dict:
    """`run_artifact` in a child process. Returns its result, or ``{"failure": {...}}`` with
    ``type`` ('abort' for a signal, 'error', 'timeout') and ``message`` (the first line that
    explains it) when the child does not finish."""
    with tempfile.TemporaryDirectory(prefix="care_q_eval_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        err_path = Path(tmp) / "stderr.txt"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "care_q.eval.worker", str(spec_path)],
                                    stdout=subprocess.PIPE, stderr=err, env=env, text=True)
            timed_out = False
            try:
                for line in proc.stdout:
                    if line.startswith("P ") and advance:
                        advance(int(line.split()[1]))
                    if timeout is not None and time.monotonic() - t0 > timeout:
                        timed_out = True
                        proc.kill()
                        break
                proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        text = err_path.read_text(errors="replace")
    if proc.returncode == 0 and Path(spec["out"]).exists():
        with np.load(spec["out"]) as z:
            return {k: z[k] for k in z.files}
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if timed_out:
        return {"failure": {"type": "timeout", "message": f"no result after {timeout:.0f} s"}}
    if proc.returncode < 0:
        native = [ln for ln in lines if "abort" in ln.lower() or "error" in ln.lower() or "check failed" in ln.lower()]
        detail = (native or lines or [""])[-1][:300]
        return {"failure": {"type": "abort", "signal": _signal_name(proc.returncode),
                            "message": f"the runtime process died with {_signal_name(proc.returncode)}"
                                       + (f": {detail}" if detail else "")}}
    msg = next((ln[len("ERROR "):] for ln in reversed(lines) if ln.startswith("ERROR ")), None)
    return {"failure": {"type": "error", "exit_code": proc.returncode,
                        "message": (msg or (lines[-1] if lines else "no output"))[:400]}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    import torch

    torch.set_num_threads(1)

    def advance(n: int) -> None:
        print(f"P {n}", flush=True)

    try:
        run_artifact(spec, advance)
    except CareQError as e:
        print(f"ERROR {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # reported by the parent as the artifact's failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"ERROR {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
