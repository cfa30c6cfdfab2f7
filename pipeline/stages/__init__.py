"""The stages: one module (or package) per asset, named after it; plain functions, tested without Dagster.
Stages import pipeline.core, never pipeline.ops."""
