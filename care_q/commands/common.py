"""Arguments several commands share, so their names, defaults and help read the same everywhere."""

from __future__ import annotations


def add_model_args(p, weights_required: bool = False, img_size: bool = True) -> None:
    """--model, --weights (official checkpoint + sidecar), --img-size."""
    p.add_argument("--model", required=True, help="care_s0 | care_s1 | care_s2")
    p.add_argument("--weights", required=weights_required,
                   help="official-format checkpoint (sidecar JSON used if present)")
    if img_size:
        p.add_argument("--img-size", type=int, help="input resolution (default: sidecar, else 224)")


def add_data_root(p) -> None:
    p.add_argument("--data-root", help="data root (default: $CARE_Q_DATA)")


def add_recipe(p, default: str) -> None:
    p.add_argument("--recipe", default=default, help=f"recipe name (care-q recipes) or YAML path (default {default})")


def add_threads(p, default: int | None = 2, what: str = "runtime and torch threads") -> None:
    p.add_argument("--threads", type=int, default=default,
                   help=f"{what} (default {default if default is not None else 'torch' + chr(39) + 's choice'})")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` to torch (None: leave torch's default)."""
    if threads is None:
        return
    import torch

    from care_q.errors import CareQError

    if threads < 1:
        raise CareQError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)
