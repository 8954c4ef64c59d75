"""Data: named datasets and calibration sets (``calibration/*.yaml``), transforms, synthetic data."""

from care_q.data.datasets import (
    DatasetDef,
    DatasetInfo,
    DataWarning,
    ImageFolderSet,
    check_classes,
    get_dataset,
    inspect_dataset,
    list_datasets,
    load_definition,
    make_loader,
    progress_bar,
    stage,
    track,
)
from care_q.data.transforms import build_transform

__all__ = ["DataWarning", "DatasetDef", "DatasetInfo", "ImageFolderSet", "build_transform",
           "check_classes", "get_dataset", "inspect_dataset", "list_datasets", "load_definition",
           "make_loader", "progress_bar", "stage", "track"]
