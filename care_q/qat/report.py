"""The QAT run's report.md."""

from __future__ import annotations

from pathlib import Path


def render_markdown(r: dict) -> str:
    t = r["train"]
    L = [f"# care-q QAT report: {r['model']} ({r['img_size']}x{r['img_size']}), recipe `{r['recipe']['name']}`", "",
         f"- recipe: `{r['recipe']['name']}` ({r['recipe']['source']}), io: {r['io']}",
         f"- weights: {r['weights']}; training set: `{r['dataset']}`",
         f"- start: PTQ calibration of the same recipe on `{r['calibration']['set']}`, "
         f"{r['calibration']['images']} images",
         f"- training: {t['steps']} steps ({t['epochs']:g} epochs of {t['steps_per_epoch']}), global batch "
         f"{t['global_batch']} = {t['processes']} process(es) x {t['per_process_batch']}, lr {t['lr']:g}, "
         f"device {t['device']}" + (f", backend {t['backend']}" if t["backend"] else ""),
         f"- throughput (this session): {t['this_session_images_per_s']} img/s over "
         f"{t['this_session_seconds']} s of training steps",
         f"- total time: {r.get('seconds')} s", ""]
    for n in r["notes"]:
        L.append(f"> note: {n}")
    acc = r.get("accuracy", {})
    if "qat_top1" in acc:
        L += ["", f"## Top-1 on `{acc['eval_set']['name']}` ({acc['eval_set']['images']} images)", "",
              "| model | top-1 | vs FP32 | same class as FP32 |", "|---|---:|---:|---:|"]
        fp = acc.get("fp32_top1")
        for label, key, agree in (("FP32 (teacher)", "fp32_top1", None),
                                  ("PTQ, same recipe (fake-quant)", "ptq_top1", "ptq_fp32_agreement"),
                                  ("QAT (fake-quant = exported graph)", "qat_top1", "qat_fp32_agreement")):
            if key in acc:
                d = f"{acc[key] - fp:+.2f} pt" if fp is not None else ""
                a = f"{acc[agree]:.2f}%" if agree in acc else ""
                L.append(f"| {label} | {acc[key]:.2f}% | {d} | {a} |")
    if t["history"]:
        L += ["", "## Training", "", "| epoch | step | loss | CE | KL | s | img/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for h in t["history"]:
            L.append(f"| {h['epoch']} | {h['step']} | {h['loss']:.4f} | {h['ce']:.4f} | {h['kd']:.4f} | "
                     f"{h['seconds']} | {h['images_per_s']} |")
    if "learnt_scales" in r:
        ls = r["learnt_scales"]
        rt = ls["ratio_to_calibrated"]
        L += ["", f"Learnt activation scales (LSQ): {ls['groups']} groups, learnt/calibrated ratio min "
                  f"{rt['min']:.3f}, median {rt['median']:.3f}, max {rt['max']:.3f}."]
    if r.get("artifacts"):
        L += ["", "## Artifacts, verified in their runtimes against the fake-quant model", "",
              f"Verification images: `{r['verification_images']['set']}` ({r['verification_images']['images']}, "
              f"not used for training). Target agreement {100 * r['target_agreement']:.1f}%.", "",
              "| target | file | size (MB) | top-1 agreement | logit SQNR (dB) | max abs diff |",
              "|---|---|---:|---:|---:|---:|"]
        for tg, a in r["artifacts"].items():
            v = a["verification"]
            L.append(f"| {tg} | `{Path(a['path']).name}` | {a['size_bytes'] / 1e6:.2f} | "
                     f"{100 * v['top1_agreement']:.1f}% | {v['logit_sqnr_db']:.1f} | {v['max_abs_diff']:.3g} |")
        L += ["", "## Where the ops run (care-q check)", ""]
        for tg, a in r["artifacts"].items():
            L += [f"- {tg}: " + line for line in a.get("census", [])]
    L += ["", "(every tensor's parameters: `report.json` -> `tensors`; resumable state: "
              f"`{Path(r['checkpoint']).name}`)", ""]
    return "\n".join(L)
