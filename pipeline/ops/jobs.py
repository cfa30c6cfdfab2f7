"""Jobs of the code location, and the run-config presets (YAML files in ``pipeline/presets/``).

Presets show in the Dagster launchpad as jobs of their own (``full_pipeline_job`` is the
``cpu-demo`` preset); on the command line pass the YAML file:

    dagster asset materialize -m pipeline.definitions --select 'not group:sweep' -c
    pipeline/presets/gpu-qwen2.5-1.5b.yaml
    dagster job launch -m pipeline.definitions -j full_pipeline_job -c pipeline/presets/seed-qwen1.5-1.8b.yaml

Every job that trains carries the run tag ``medtune/training``; the instance's run queue lets one
such run go at a time (``pipeline/dagster.yaml``), so a sensor run and a manual run never fight
for one GPU.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster import AssetSelection, define_asset_job

PRESETS_DIR = Path(__file__).parents[1] / "presets"
PRESETS = ("cpu-demo", "cpu-thorough", "gpu-qwen2.5-1.5b", "gpu-qwen2.5-1.5b-qlora", "seed-qwen1.5-1.8b")
TRAINING_TAG = "medtune/training"


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no preset {name!r}: choose one of {', '.join(PRESETS)} ({PRESETS_DIR})")
    return yaml.safe_load(path.read_text()) or {}


def preset_job_name(name: str) -> str:
    return "preset_" + name.replace("-", "_").replace(".", "_") + "_job"


DATA_SELECTION = AssetSelection.groups("data") | AssetSelection.assets("base_model")
PIPELINE_SELECTION = AssetSelection.all() - AssetSelection.groups("sweep")  # the sweep's trials are partitions
TRAIN_SELECTION = AssetSelection.assets("lora_adapter").downstream()
TRAINING_TAGS = {TRAINING_TAG: "true"}

prepare_data_job = define_asset_job(
    "prepare_data_job", selection=DATA_SELECTION, description="Raw files to the tokenized dataset (and the base model)"
)
train_job = define_asset_job(
    "train_job",
    selection=TRAIN_SELECTION,
    tags=TRAINING_TAGS,
    description="Train the LoRA adapter, evaluate it against the base model, export the merged model and register it",
)
full_pipeline_job = define_asset_job(
    "full_pipeline_job",
    selection=PIPELINE_SELECTION,
    tags=TRAINING_TAGS,
    description="Everything, from the raw files to the registered model (preset cpu-demo: the Config defaults)",
)
preset_jobs = [
    define_asset_job(
        preset_job_name(name),
        selection=PIPELINE_SELECTION,
        config=load_preset(name),
        tags={**TRAINING_TAGS, "medtune/preset": name},
        description=f"full_pipeline_job with the {name} preset (pipeline/presets/{name}.yaml)",
    )
    for name in PRESETS
    if name != "cpu-demo"
]
# a sweep (pipeline.ops.sweep runs the three in turn; in the UI: the plan, a backfill of the trials, the comparison)
sweep_plan_job = define_asset_job(
    "sweep_plan_job",
    selection=DATA_SELECTION | AssetSelection.assets("sweep_plan"),
    description="The data a sweep trains on, and the sweep's plan (its trials become sweep_trial partitions)",
)
sweep_trial_job = define_asset_job(
    "sweep_trial_job",
    selection=AssetSelection.assets("sweep_trial"),
    tags=TRAINING_TAGS,
    description="Sweep trials (one partition each): train and evaluate",
)
sweep_comparison_job = define_asset_job(
    "sweep_comparison_job",
    selection=AssetSelection.assets("sweep_comparison"),
    description="The sweep's trials side by side (table and plots, also on the MLflow parent run)",
)
JOBS = [
    prepare_data_job,
    train_job,
    full_pipeline_job,
    *preset_jobs,
    sweep_plan_job,
    sweep_trial_job,
    sweep_comparison_job,
]
