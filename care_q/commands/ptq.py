"""care-q ptq: post-training quantization to int8 TFLite and ONNX QDQ."""

from __future__ import annotations

from care_q.commands.common import add_data_root, add_model_args, add_threads
from care_q.errors import CareQError

# --for: which recipe serves which kind of device (a recipe given with --recipe overrides it)
RECIPE_FOR = {"cpu": "ptq_int8_cpu", "npu": "npu_int8_ptq", "ethos-u": "npu_int8_ptq_ethosu"}
NPU_DEVICES = tuple(d for d in RECIPE_FOR if d != "cpu")  # TFLite only


def add_parser(sub):
    p = sub.add_parser("ptq", help="quantize a CARE model to int8 .tflite and QDQ .onnx",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--calib", default="imagenet_1k_subset", help="calibration set name or ImageFolder path")
    add_data_root(p)
    p.add_argument("--num-calib", type=int, help="calibration images (default: the whole set)")
    p.add_argument("--for", dest="for_device", choices=sorted(RECIPE_FOR), default="cpu",
                   help="the device the artifacts are for: cpu (default: recipe ptq_int8_cpu, .tflite + .onnx); npu "
                        "(recipe npu_int8_ptq: a fully int8 .tflite, int8 in and out, whole on Edge TPU and NNAPI FL6+); "
                        "ethos-u (recipe npu_int8_ptq_ethosu: the same family without L2_NORMALIZATION, whole on "
                        "Ethos-U55/U65/U85 as Vela compiles it, Edge TPU and NNAPI FL7+)")
    p.add_argument("--recipe", help="recipe name (care-q recipes) or YAML path (default: the --for device's)")
    p.add_argument("--target", default=None, help="comma list: tflite,onnx (default: the recipe's)")
    p.add_argument("--io", choices=["float", "int8"], help="artifact input/output type (default: recipe)")
    p.add_argument("--num-verify", type=int, default=128,
                   help="held-out images for runtime verification (default 128; below 99%% top-1 agreement it fails)")
    p.add_argument("--latency-runs", type=int, default=20,
                   help="timed runs per artifact vs FP32 (0: skip latency)")
    add_threads(p)
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="fail when an artifact's top-1 agreement with the fake-quant reference is lower")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where reconstruction recipes learn (auto: CUDA when present)")
    p.add_argument("--recon-steps", type=int,
                   help="reconstruction steps per unit, for recipes that reconstruct (default: the recipe's; "
                        "fewer is faster and less exact)")
    p.add_argument("--kernel-profile", metavar="JSON",
                   help="for recipes that choose TFLite kernels by timing (ptq_int8_cpu): one-op timings measured on "
                        "the target device (care-q bench --kernel-profile) instead of this machine")
    p.add_argument("--fallback-synthetic", action="store_true",
                   help="calibrate on data-free synthetic_bn when the set is unavailable")
    p.add_argument("--out", required=True, help="output folder")
    return p


def recipe_for(args) -> str:
    """The recipe of a run: --recipe, else the --for device's; an NPU run asks for no ONNX artifact."""
    targets = args.target.split(",") if args.target else []
    if args.for_device in NPU_DEVICES and "onnx" in targets:
        raise CareQError(f"--for {args.for_device} writes a .tflite (the NPU runtimes read TFLite); --target onnx has "
                         "no NPU form")
    return args.recipe or RECIPE_FOR[args.for_device]


def run(args) -> int:
    from rich.console import Console

    from care_q.ptq import ptq

    r = ptq(args.model, weights=args.weights, calib=args.calib, data_root=args.data_root,
            num_calib=args.num_calib, recipe=recipe_for(args),
            targets=args.target.split(",") if args.target else None, img_size=args.img_size, io=args.io,
            out=args.out, num_verify=args.num_verify, threads=args.threads, latency_runs=args.latency_runs,
            fallback_synthetic=args.fallback_synthetic, min_agreement=args.min_agreement, device=args.device,
            recon_steps=args.recon_steps, kernel_profile=args.kernel_profile)
    c = Console(highlight=False)
    for t, a in r["artifacts"].items():
        v = a["verification"]
        f = v.get("vs_fp32", {})
        c.print(f"[green]{t}[/]: {a['path']} ({a['size_bytes'] / 1e6:.2f} MB), "
                f"top-1 agreement with its fake-quant reference {100 * v['top1_agreement']:.1f}%"
                + (f"; vs FP32: top-1 agreement {100 * f['top1_agreement']:.1f}%, logit SQNR "
                   f"{f['logit_sqnr_db']:.1f} dB" if f else ""))
    for t, m in r.get("latency", {}).items():
        c.print(f"{t}: int8 {m['int8']['median_ms']:.2f} ms vs fp32 {m['fp32']['median_ms']:.2f} ms "
                f"({m['ratio']:.2f}x), size {m['size_ratio']:.2f}x")
    c.print(f"report: {args.out}/report.md ({r['seconds']} s)")
    return 0
