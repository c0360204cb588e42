"""Ratio benchmarks against raw baselines measured in the same run (see BENCHMARKS.md)."""
