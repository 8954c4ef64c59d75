"""Latency and accuracy measurement."""
