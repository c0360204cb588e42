"""Labelled routing-quality evaluation (issue 10): dataset, payload generators, runner."""
