"""MedTune: a Dagster code location that turns an Alpaca-format instruction dump into a tuned model.

The stage logic lives in plain modules of this package (``ingest``, ``validate``, ``dedup``,
``split``, ``model_source``, ``tokenization``) that tests call without Dagster; the Dagster
assets in the top-level ``assets`` package are thin wrappers around them.
"""

__version__ = "0.1.0"
