"""care-q: quantization and compression of CARE Transformers for phones and NPUs."""

from care_q.errors import CareQError
from care_q.models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["CareQError", "create_model", "list_models", "__version__"]
