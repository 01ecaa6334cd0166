"""Evaluation: benchmarks and the measurements in model cards."""
