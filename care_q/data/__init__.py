"""Data: named datasets and calibration sets (``care_q/data/sets/*.yaml``), transforms, synthetic data."""

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
)
from care_q.data.transforms import build_transform
from care_q.utils.progress import progress_bar, stage, track  # re-exported until every importer uses utils.progress

__all__ = ["DataWarning", "DatasetDef", "DatasetInfo", "ImageFolderSet", "build_transform",
           "check_classes", "get_dataset", "inspect_dataset", "list_datasets", "load_definition",
           "make_loader", "progress_bar", "stage", "track"]
