"""MedTune: a Dagster code location that turns an Alpaca-format instruction dump into a tuned model.

Three kinds of code, three folders; imports only point down (ops → stages → core):

* ``pipeline.stages``: one module or package per asset, named after it (``raw_records``,
  ``validated_records``, ... ``lora_adapter``, ``evaluation_report``, ``merged_model``,
  ``registered_model``): plain functions that tests call without Dagster. The Dagster assets in the
  top-level ``assets`` package, of the same names, are thin wrappers around them.
* ``pipeline.core``: what every stage shares (atomic writes, fingerprints, the record layout,
  secrets, the MLflow client that survives outages).
* ``pipeline.ops``: what runs the pipeline (jobs, sensors and schedules, the UI launcher,
  screenshots, the summary, recovery).

``pipeline.definitions`` is the code location (``defs``); ``pipeline/presets/`` holds the named
run configs, ``pipeline/dagster.yaml`` the instance settings.
"""

__version__ = "0.1.0"
