"""Dagster resources of the MedTune code location (``ConfigurableResource`` classes)."""

from resources.data_root import DataRoot, default_data_dir
from resources.mlflow_tracking import MlflowTracking
from resources.stage_io import StageIOManager

__all__ = ["DataRoot", "MlflowTracking", "StageIOManager", "default_data_dir"]
