"""Quantization: shared vocabulary, observers, recipes, the per-tensor plan, fake quantization."""
