"""Projection workers: turn streams into state."""
