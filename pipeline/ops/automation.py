"""``raw_data_sensor`` (on by default) and ``periodic_retrain_schedule`` (off by default).

The sensor fingerprints ``$MEDTUNE_DATA_DIR/raw/`` by content (``pipeline.ops.raw_watch``) and, once a
change has settled, requests one ``full_pipeline_job`` run keyed by the new fingerprint. Both
re-run with the run config of the last successful full-pipeline run (the preset the user chose),
or the defaults when there is none. Settings: ``pipeline/ops/automation.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from dagster import (
    AssetKey,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SkipReason,
    schedule,
    sensor,
)

from pipeline.ops.jobs import full_pipeline_job
from pipeline.ops.raw_watch import WatchState, decide, raw_fingerprint
from pipeline.ops.recover import recover_dead_runs
from pipeline.ops.run_data import prune_run_data
from resources.data_root import DataRoot

SETTINGS = yaml.safe_load(Path(__file__).with_name("automation.yaml").read_text())
SENSOR = SETTINGS["raw_data_sensor"]
SCHEDULE = SETTINGS["periodic_retrain_schedule"]
FULL_JOBS = ("full_pipeline_job", "__ASSET_JOB")
RAW_TAG = "medtune/raw_fingerprint"  # the raw data a sensor run was requested for


def last_run_config(instance) -> dict:
    """The run config of the latest successful run that built the whole pipeline."""
    runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.SUCCESS]), limit=50)
    for run in runs:
        if (
            run.job_name == "full_pipeline_job"
            or (run.job_name == "__ASSET_JOB" and "lora_adapter" in (run.run_config or {}).get("ops", {}))
            or run.job_name.startswith("preset_")
        ):
            config = dict(run.run_config or {})
            return {k: v for k, v in config.items() if k in ("ops", "resources", "execution")}
    return {}


def built_fingerprint(instance) -> str | None:
    event = instance.get_latest_materialization_event(AssetKey("raw_records"))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("raw_fingerprint")
    return getattr(value, "value", value)


@sensor(
    job=full_pipeline_job,
    minimum_interval_seconds=int(SENSOR["minimum_interval_seconds"]),
    default_status=DefaultSensorStatus.RUNNING,
    description="Retrain when the content of $MEDTUNE_DATA_DIR/raw/ changes (content hashes, debounced)",
)
def raw_data_sensor(context: SensorEvaluationContext, data_root: DataRoot):
    try:  # a run killed outright would hold the training slot forever: free it (pipeline.ops.recover)
        recover_dead_runs(context.instance, log=context.log.warning)
        prune_run_data(context.instance, data_root.runs_dir, log=context.log.info)
    except Exception as exc:  # never let the clean-up stop the sensor
        context.log.warning(f"could not check for dead runs or prune their data: {exc}")
    fingerprint = raw_fingerprint(data_root.raw_dir, data_root.raw_digests_path)
    state = WatchState.load(context.cursor)
    built = built_fingerprint(context.instance) if state.seen is None else None
    decision = decide(state, fingerprint, time.time(), float(SENSOR["quiet_seconds"]), built)
    context.update_cursor(decision.state.dump())
    if decision.action != "run":
        return SkipReason(decision.message)
    # Dagster skips a run key it has seen: data put back to a state built before gets a key of its own
    earlier = context.instance.get_run_ids(filters=RunsFilter(tags={RAW_TAG: fingerprint[:16]}))
    if earlier:
        decision.message += (
            f" (this data was built before, by run {earlier[0][:8]}: running again; unchanged outputs come "
            "from the caches)"
        )
    context.log.info(decision.message)
    return RunRequest(
        run_key=f"raw-{fingerprint}" + (f"-{len(earlier)}" if earlier else ""),
        run_config=last_run_config(context.instance),
        tags={"medtune/trigger": "raw_data_sensor", RAW_TAG: fingerprint[:16]},
    )


@schedule(
    job=full_pipeline_job,
    cron_schedule=SCHEDULE["cron"],
    execution_timezone=SCHEDULE.get("timezone", "UTC"),
    default_status=DefaultScheduleStatus.STOPPED,
    description="Periodic retraining; with unchanged data every output is reused and nothing retrains",
)
def periodic_retrain_schedule(context: ScheduleEvaluationContext):
    return RunRequest(
        run_config=last_run_config(context.instance), tags={"medtune/trigger": "periodic_retrain_schedule"}
    )
