"""Dagster assets of the MedTune code location: one module per asset, each a thin wrapper
around the stage function named in its docstring."""
