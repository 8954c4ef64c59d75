"""What ai-edge-litert's interpreter actually delegated to XNNPACK: the census's ground truth.

Loads the model with the default XNNPACK delegate (as `care_q.runtime.load_runner` does) and reads
the interpreter's node list: delegate kernels are nodes named DELEGATE, appended after the original
nodes; a partition's original nodes are those reached backwards from the kernel's outputs without
crossing its inputs (the same walk as `care_q.runtime.delegate_info`, kept per partition here).
"""

from __future__ import annotations

from pathlib import Path

from care_q.runtime import capture_stderr


def xnnpack_partitions(path: str | Path, threads: int = 1) -> dict:
    """``{"partitions": [[op indices], ...], "delegated": [...], "total_nodes": M}``, or
    ``{"error": message}`` when the interpreter cannot prepare the delegate (a load error)."""
    from ai_edge_litert.interpreter import Interpreter


    log = [""]
    try:
        with capture_stderr() as log:
            it = Interpreter(model_path=str(path), num_threads=threads)
            it.allocate_tensors()
    except Exception as e:  # the interpreter raises RuntimeError/ValueError with the native log
        native = " ".join(ln.strip() for ln in (log[0] if log else "").splitlines()
                          if ln.strip() and not ln.startswith("INFO:"))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"error": (msg + (f" ({native[:200]})" if native else ""))[:400]}
    ii = it._interpreter
    n = ii.NumNodes()
    names = [ii.NodeName(i) for i in range(n)]
    ins = [list(ii.NodeInputs(i)) for i in range(n)]
    outs = [list(ii.NodeOutputs(i)) for i in range(n)]
    original = [i for i in range(n) if names[i] != "DELEGATE"]
    producer = {t: i for i in original for t in outs[i]}
    parts = []
    for d in (i for i in range(n) if names[i] == "DELEGATE"):
        stop = set(ins[d])
        seen: set[int] = set()
        stack = [producer[t] for t in outs[d] if t in producer]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(producer[t] for t in ins[i] if t >= 0 and t in producer and t not in stop)
        parts.append(sorted(seen))
    return {"partitions": parts, "delegated": sorted(i for p in parts for i in p), "total_nodes": len(original),
            "undelegated_ops": _counts(names[i] for i in original if not any(i in p for p in parts))}


def _counts(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
