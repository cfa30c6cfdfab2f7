"""Asset ``sweep_plan``: a sweep's grid (method x rank x learning rate, ...) expanded into trials
(``pipeline.stages.sweep_plan``).

Each trial becomes a partition of ``sweep_trial`` (``<sweep>.<label>``): it shows in the UI on its
own, runs alone or in a backfill, and is cached by its adapter id. The sweep gets one MLflow
parent run; each trial's run is its child. ``sweep_comparison`` puts them side by side.
Run a preset with ``make sweep`` (``pipeline/presets/sweep-cpu.yaml``), or from the UI:
materialize this asset, backfill ``sweep_trial``, then materialize ``sweep_comparison``.
"""

import json

from dagster import AssetExecutionContext, Config, Failure, MetadataValue, Output, asset
from pydantic import ValidationError

from assets.lora_adapter import LoraAdapterConfig
from pipeline.core.atomic import write_bytes_atomic
from pipeline.core.fingerprint import sha256_json
from pipeline.core.markdown import table
from pipeline.stages.sweep_plan import (
    PARTITIONS,
    SweepError,
    SweepPlan,
    SweepSettings,
    check_name,
    expand,
    partition_key,
)
from resources.data_root import DataRoot
from resources.mlflow_tracking import MlflowTracking

PLAN = "plan.json"


class SweepPlanConfig(Config, SweepSettings):
    """A sweep's name, grid and trials
    (declared in ``pipeline.stages.sweep_plan.SweepSettings``)."""


def sweep_dir(data_root: DataRoot, name: str):
    return data_root.root / "sweeps" / name


def read_plan(data_root: DataRoot, name: str) -> dict:
    path = sweep_dir(data_root, name) / PLAN
    if not path.is_file():
        raise Failure(description=f"sweep {name!r} has no plan ({path}): materialize sweep_plan first")
    return json.loads(path.read_text())


@asset(group_name="sweep", compute_kind="mlflow", description=__doc__)
def sweep_plan(
    context: AssetExecutionContext, config: SweepPlanConfig, data_root: DataRoot, mlflow: MlflowTracking
) -> Output[SweepPlan]:
    from assets.evaluation_report import EvaluationReportConfig

    try:
        name = check_name(config.name)
        trials = expand(config.base, config.grid, config.trials, config.per_method)
    except SweepError as exc:
        raise Failure(description=str(exc)) from None
    problems = []
    for t in trials:  # every trial's settings are lora_adapter settings: refused here, before any training
        try:
            LoraAdapterConfig(**t.settings)
        except ValidationError as exc:
            problems.append(f"trial {t.label}: {exc}")
    try:
        EvaluationReportConfig(**config.evaluation)
    except ValidationError as exc:
        problems.append(f"evaluation: {exc}")
    if problems:
        raise Failure(description="the sweep's settings are invalid:\n" + "\n".join(problems)[:4000])
    plan = {"name": name, "trials": {t.label: t.settings for t in trials}, "evaluation": config.evaluation}
    fingerprint = sha256_json(plan)[:16]
    folder = sweep_dir(data_root, name)
    earlier = json.loads((folder / PLAN).read_text()) if (folder / PLAN).is_file() else {}
    parent = earlier.get("parent_run_id") if earlier.get("fingerprint") == fingerprint else None
    client = mlflow.client()
    if parent is None:
        mlflow.check_reachable()
        run = client.create_run(
            mlflow.experiment_id(),
            tags={
                "mlflow.runName": f"sweep-{name}",
                "medtune.sweep": name,
                "medtune.sweep_fingerprint": fingerprint,
                "dagster.run_id": context.run.run_id,
                "mlflow.note.content": f"Sweep {name}: {len(trials)} trials; children are the trials",
            },
        )
        parent = run.info.run_id
        client.log_param(parent, "trials", len(trials))
        client.log_param(parent, "grid", json.dumps(config.grid)[:250])
        client.log_text(parent, json.dumps(plan, indent=1), "sweep_plan.json")
        context.log.info(f"sweep {name}: MLflow parent run {parent}")
    else:
        context.log.info(f"sweep {name}: same plan as before, parent run {parent} reused (finished trials are cached)")
    keys = [partition_key(name, t.label) for t in trials]
    stale = [
        k for k in context.instance.get_dynamic_partitions(PARTITIONS) if k.startswith(f"{name}.") and k not in keys
    ]
    for key in stale:
        context.instance.delete_dynamic_partition(PARTITIONS, key)
    context.instance.add_dynamic_partitions(PARTITIONS, keys)
    write_bytes_atomic(
        folder / PLAN,
        json.dumps(
            {**plan, "fingerprint": fingerprint, "parent_run_id": parent}, ensure_ascii=False, indent=1
        ).encode(),
    )
    exp_id = client.get_run(parent).info.experiment_id
    plan_table = table(["partition", "settings"], [(k, json.dumps(t.settings)) for k, t in zip(keys, trials)])
    return Output(
        SweepPlan(name, keys, parent, fingerprint),
        metadata={
            "sweep": name,
            "trials": len(trials),
            "fingerprint": fingerprint,
            "plan": MetadataValue.md(plan_table),
            "removed_partitions": ", ".join(stale),
            "path": MetadataValue.path(str(folder / PLAN)),
            "mlflow_parent_run": MetadataValue.url(mlflow.run_link(parent, exp_id)),
        },
    )
