"""Hydra glue: where the configs live, known keys, value checks, and a run's settings.

Light on purpose (no torch at import), so that a mistyped key or value is reported in about a second.
"""
