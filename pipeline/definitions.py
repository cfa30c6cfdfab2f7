"""The MedTune Dagster code location: ``dagster dev`` (via workspace.yaml) loads ``defs``."""

from __future__ import annotations

from dagster import (
    AssetSelection,
    Definitions,
    PipesSubprocessClient,
    define_asset_job,
    load_asset_checks_from_modules,
    load_assets_from_modules,
)

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
    tokenized_dataset,
    validated_records,
)
from resources import DataRoot, MlflowTracking, StageIOManager, default_data_dir

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
]


def make_resources(data_dir: str | None = None, tracking_uri: str | None = None) -> dict:
    root = DataRoot(path=data_dir or default_data_dir())
    mlflow = MlflowTracking(tracking_uri=tracking_uri) if tracking_uri else MlflowTracking()
    return {
        "data_root": root,
        "io_manager": StageIOManager(data_root=root),
        "mlflow": mlflow,
        "pipes_subprocess_client": PipesSubprocessClient(),
    }


all_assets = load_assets_from_modules(ASSET_MODULES)
all_asset_checks = load_asset_checks_from_modules(ASSET_MODULES)

DATA_SELECTION = AssetSelection.groups("data") | AssetSelection.assets("base_model")
prepare_data_job = define_asset_job(
    "prepare_data_job", selection=DATA_SELECTION, description="Raw files to the tokenized dataset (and the base model)"
)
train_job = define_asset_job(
    "train_job",
    selection=AssetSelection.assets("lora_adapter").downstream(),
    description="Train the LoRA adapter, evaluate it against the base model, export the merged model and register it",
)
full_pipeline_job = define_asset_job("full_pipeline_job", selection=AssetSelection.all(), description="Everything")
JOBS = [prepare_data_job, train_job, full_pipeline_job]

defs = Definitions(assets=all_assets, asset_checks=all_asset_checks, jobs=JOBS, resources=make_resources())
