"""CARE model zoo: architecture (care.py), building and checkpoint loading (builder.py)."""

from care_q.models.builder import (
    PreprocessConfig,
    create_model,
    list_models,
    load_sidecar,
    randomize_like_trained,
    read_state_dict,
    save_checkpoint,
)
from care_q.models.care import CARE, CARE_CONFIGS, CareConfig, checkpoint_filter_fn

__all__ = ["CARE", "CARE_CONFIGS", "CareConfig", "PreprocessConfig", "checkpoint_filter_fn",
           "create_model", "list_models", "load_sidecar", "randomize_like_trained", "read_state_dict", "save_checkpoint"]

from care_q.models import timm_registry  # noqa: E402,F401  (registers care_* with timm)
