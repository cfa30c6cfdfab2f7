"""The MedTune Dagster code location: ``dagster dev`` (via workspace.yaml) loads ``defs``."""

from __future__ import annotations

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from assets import (
    alpaca_dataset,
    base_model,
    deduplicated_records,
    evaluation_report,
    lora_adapter,
    merged_model,
    raw_records,
    registered_model,
    rejected_records,
    sweep_comparison,
    sweep_plan,
    sweep_trial,
    tokenized_dataset,
    validated_records,
)
from pipeline.core.quick_exit import freeze_at_exit
from pipeline.ops.automation import periodic_retrain_schedule, raw_data_sensor
from pipeline.ops.jobs import JOBS
from resources import DataRoot, MlflowTracking, StageIOManager, default_data_dir
from resources.training_launcher import TrainingLauncher

ASSET_MODULES = [
    raw_records,
    validated_records,
    deduplicated_records,
    rejected_records,
    alpaca_dataset,
    base_model,
    tokenized_dataset,
    lora_adapter,
    evaluation_report,
    merged_model,
    registered_model,
    sweep_plan,
    sweep_trial,
    sweep_comparison,
]


def make_resources(data_dir: str | None = None, tracking_uri: str | None = None) -> dict:
    root = DataRoot(path=data_dir or default_data_dir())
    mlflow = MlflowTracking(tracking_uri=tracking_uri) if tracking_uri else MlflowTracking()
    return {
        "data_root": root,
        "io_manager": StageIOManager(data_root=root),
        "mlflow": mlflow,
        "training_launcher": TrainingLauncher(),
    }


all_assets = load_assets_from_modules(ASSET_MODULES)
all_asset_checks = load_asset_checks_from_modules(ASSET_MODULES)

defs = Definitions(
    assets=all_assets,
    asset_checks=all_asset_checks,
    jobs=JOBS,
    sensors=[raw_data_sensor],
    schedules=[periodic_retrain_schedule],
    resources=make_resources(),
)

# every process that loads the code location (a materialization, a run worker, the code server)
# exits without the last full garbage collections: 2 s or more each (pipeline/core/quick_exit.py)
freeze_at_exit()
