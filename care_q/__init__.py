"""care-q: quantization and compression of CARE Transformers for phones and NPUs."""

from care_q.errors import CareQError
from care_q.version import __version__

# torch and timm load on first use of the model API (`care-q --help` and `care-q recipes` start
# in a fraction of a second instead of ~6 s)
_LAZY = {"create_model": "care_q.models", "list_models": "care_q.models"}



def check(path, targets=("xnnpack", "nnapi", "edgetpu"), runtime: bool = True):
    """Compatibility census of a .tflite/.onnx artifact (see `care_q.census.check`)."""
    from care_q.census import check as _check

    return _check(path, targets, runtime)


def deploy(model):
    """The FP32-equivalent inference form of a CARE model (see `care_q.transforms.deploy`)."""
    from care_q.transforms import deploy as _deploy

    return _deploy(model)


def __getattr__(name: str):
    # `care_q.ptq(...)`: the module care_q.ptq is callable (it forwards to care_q.ptq.ptq), so
    # the attribute works whether or not the submodule was imported before.
    if name == "ptq":
        import care_q.ptq as module

        return module
    if name == "qat":  # likewise: `care_q.qat(...)` runs care_q.qat.qat
        import care_q.qat as module

        return module
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'care_q' has no attribute '{name}'")


__all__ = ["CareQError", "check", "create_model", "deploy", "list_models", "ptq", "qat", "__version__"]
