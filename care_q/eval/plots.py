"""The report's figures as PNG bytes (matplotlib, Agg backend, no display, no network)."""

from __future__ import annotations

import io
import math

import numpy as np

GROUP_COLORS = {"care-q": "#1f77b4", "baseline": "#d62728", "fp32": "#7f7f7f", "int8": "#2ca02c"}
RUNTIME_MARKERS = {"tflite": "o", "onnx": "s"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, tight: bool = True) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, **({"bbox_inches": "tight"} if tight else {}))
    _plt().close(fig)
    return buf.getvalue()


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def tradeoff(points: list[dict], title: str = "Accuracy drop vs latency") -> bytes:
    """Scatter: x = latency ratio to the FP32 artifact of the same runtime, y = top-1 drop (points).

    ``points``: dicts with ``label``, ``ratio``, ``drop``, ``group`` (care-q / baseline / fp32),
    ``runtime`` (tflite / onnx)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    shown = [p for p in points if _finite(p.get("ratio")) and _finite(p.get("drop"))]
    for p in shown:
        ax.scatter(p["ratio"], p["drop"], s=70, c=GROUP_COLORS.get(p.get("group"), "#9467bd"),
                   marker=RUNTIME_MARKERS.get(p.get("runtime"), "D"), edgecolors="black", linewidths=0.5, zorder=3)
        ax.annotate(p["label"], (p["ratio"], p["drop"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("latency / FP32 latency (same runtime; lower is faster)")
    ax.set_ylabel("top-1 drop vs FP32 (points; lower is better)")
    ax.set_title(title)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in GROUP_COLORS.items()
               if any(p.get("group") == g for p in shown)]
    handles += [plt.Line2D([], [], marker=m, ls="", color="white", markeredgecolor="black", label=r)
                for r, m in RUNTIME_MARKERS.items() if any(p.get("runtime") == r for p in shown)]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    if not shown:
        ax.text(0.5, 0.5, "no artifact has both accuracy and latency", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return _png(fig)


def accuracy_bars(rows: list[dict], title: str = "Accuracy against FP32") -> bytes:
    """Two panels: top-1 drop (points) and top-1 agreement with FP32 (%) per artifact.
    ``rows``: dicts with ``label``, ``drop``, ``agreement`` (fraction), ``group``."""
    plt = _plt()
    rows = [r for r in rows if _finite(r.get("drop"))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * max(len(rows), 2) + 1.2), sharey=True)
    y = np.arange(len(rows))
    colors = [GROUP_COLORS.get(r.get("group"), "#9467bd") for r in rows]
    axes[0].barh(y, [r["drop"] for r in rows], color=colors)
    axes[0].set_xlabel("top-1 drop vs FP32 (points)")
    axes[0].axvline(0, color="black", lw=0.8)
    axes[1].barh(y, [100 * r["agreement"] for r in rows], color=colors)
    axes[1].set_xlabel("top-1 agreement with FP32 (%)")
    lo = min([100 * r["agreement"] for r in rows] + [90.0])
    axes[1].set_xlim(max(0.0, lo - 2), 100.5)
    axes[0].set_yticks(y, [r["label"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    return _png(fig)


def latency_bars(settings: dict[str, dict], title: str = "Latency (batch 1)") -> bytes:
    """One panel per setting: median latency (bar) and p90 (whisker), ratio to FP32 as text."""
    plt = _plt()
    items = [(s, v) for s, v in settings.items() if v]
    n = max(len(items), 1)
    height = sum(0.4 * max(len(v), 1) + 0.8 for _, v in items) or 2
    fig, axes = plt.subplots(n, 1, figsize=(8, height), squeeze=False)
    for ax, (setting, res) in zip(axes[:, 0], items):
        names = list(res)
        med = [res[k]["median_ms"] for k in names]
        p90 = [res[k]["p90_ms"] for k in names]
        y = np.arange(len(names))
        ax.barh(y, med, xerr=[np.zeros(len(med)), np.maximum(np.array(p90) - np.array(med), 0)],
                color=["#7f7f7f" if res[k].get("fp32") == k else "#1f77b4" for k in names], capsize=3)
        for i, k in enumerate(names):
            r = res[k].get("ratio")
            ax.text(med[i], i, f"  {med[i]:.2f} ms" + (f" ({r:.2f}x)" if _finite(r) else ""), va="center", fontsize=8)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("ms (bar: median, whisker: p90)")
        ax.set_xlim(0, max(p90 + [1e-3]) * 1.35)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def sqnr_profile(sqnr: dict[str, dict], title: str = "Per-tensor SQNR, fake-quant vs FP32") -> bytes:
    """Bars: every quantized tensor in execution order (recipe SQNR, coloured by role); dots:
    the same tensor with one global min/max. Stage boundaries marked."""
    plt = _plt()
    names = list(sqnr)
    fig, ax = plt.subplots(figsize=(11, 4.2))
    if not names:
        ax.text(0.5, 0.5, "no tensors", ha="center", transform=ax.transAxes)
        return _png(fig)
    roles = sorted({v["role"] for v in sqnr.values()})
    cmap = plt.get_cmap("tab20")
    color = {r: cmap(i % 20) for i, r in enumerate(roles)}
    x = np.arange(len(names))
    rec = np.array([v["recipe"] if _finite(v["recipe"]) else np.nan for v in sqnr.values()])
    mm = np.array([v["minmax"] if _finite(v.get("minmax")) else np.nan for v in sqnr.values()])
    ax.bar(x, np.nan_to_num(rec, nan=0.0), width=1.0, color=[color[v["role"]] for v in sqnr.values()])
    ax.plot(x, mm, ".", color="black", ms=2.5, label="one global min/max")
    prev = None
    for i, n in enumerate(names):
        stage = n.split(".")[1] if n.startswith("stages.") else n.split(".")[0]
        if prev is not None and stage != prev:
            ax.axvline(i - 0.5, color="gray", lw=0.6, ls=":")
        prev = stage
    ax.set_xlim(-1, len(names))
    ax.set_xlabel("tensor (execution order; dotted lines: stage boundaries)")
    ax.set_ylabel("SQNR (dB, higher is better)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[r], label=r) for r in roles]
    handles.append(plt.Line2D([], [], marker=".", ls="", color="black", label="global min/max"))
    ax.legend(handles=handles, fontsize=7, ncol=4, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def histograms(hists: dict[str, dict], title: str = "Attention activations and chosen ranges") -> bytes:
    """Small multiples: each tensor's calibration histogram (log10 of counts + 1), its chosen range
    (red) and the global min/max range (dashed). Where the data occupy a sliver of the chosen range
    the view is zoomed on the data and the range is printed instead."""
    from matplotlib.ticker import MaxNLocator, NullLocator

    plt = _plt()
    names = list(hists)
    cols = 4
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows + 0.6), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, n in zip(axes.ravel(), names):
        h = hists[n]
        counts = np.asarray(h["counts"], dtype=float)
        edges = np.linspace(h["lo"], h["hi"], len(counts) + 1)
        ax.stairs(np.log10(np.maximum(counts, 0) + 1), edges, fill=True, color="#6baed6")
        lo, hi = min(h["min"], h["lo"]), max(h["max"], h["hi"])
        rng = h.get("range")
        view_lo, view_hi = (min(lo, rng[0]), max(hi, rng[1])) if rng else (lo, hi)
        span = max(hi - lo, 1e-12)
        if (view_hi - view_lo) > 20 * span:  # data in a sliver of the range: zoom on the data
            view_lo, view_hi = lo - 0.1 * span, hi + 0.1 * span
        pad = 0.03 * max(view_hi - view_lo, 1e-12)
        ax.set_xlim(view_lo - pad, view_hi + pad)
        for key, style in (("minmax_range", {"color": "black", "lw": 0.8, "ls": "--"}),
                           ("range", {"color": "#d62728", "lw": 1.3})):
            for v in h.get(key) or ():
                if view_lo - pad <= v <= view_hi + pad:
                    ax.axvline(v, **style)
        ax.yaxis.set_major_locator(NullLocator())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=7)
        parts = n.split(".")
        where = f"s{parts[1]}.b{parts[3]} " if n.startswith("stages.") and len(parts) > 3 else ""
        rtxt = f"[{rng[0]:.3g}, {rng[1]:.3g}]" if rng else "float"
        ax.set_title(f"{where}{parts[-1]}: {h['method']}{' sym' if h.get('symmetric') else ''} {rtxt}", fontsize=8)
    fig.suptitle(title + " (red: chosen range, dashed: min/max; y: log count)")
    fig.subplots_adjust(hspace=0.6, wspace=0.15, top=1 - 0.85 / (2.2 * rows + 0.6))
    return _png(fig, tight=False)


def sensitivity_bars(rows: dict[str, dict], ranking: list[str], title: str = "Layer sensitivity") -> bytes:
    """Per group: disagreement with FP32 when only it is quantized, and when all but it are."""
    plt = _plt()
    names = list(ranking)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 0.3 * max(len(names), 3) + 1.2))
    only = [100 * (1 - rows[g]["only"]["agreement"]) if "only" in rows[g] else np.nan for g in names]
    allb = [100 * (1 - rows[g]["all_but"]["agreement"]) if "all_but" in rows[g] else np.nan for g in names]
    ax.barh(y - 0.2, only, height=0.4, color="#d62728", label="only this group int8")
    ax.barh(y + 0.2, allb, height=0.4, color="#1f77b4", label="all but this group int8")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 disagreement with FP32 (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return _png(fig)
