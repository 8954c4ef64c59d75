"""Graph transforms on CARE models: the deploy form."""

from care_q.transforms.deploy import DeployCARE, deploy

__all__ = ["DeployCARE", "deploy"]
