"""care-q's version (one place: the package, the CLI and the artifacts' metadata read it)."""

__version__ = "0.1.0"
