"""Asset ``sweep_trial``: one trial of a sweep, a partition per trial: train and evaluate
(``pipeline.stages.sweep_trial``).

The trial's settings come from its sweep's plan. Training is ``lora_adapter``'s (a child
process, cached by adapter id: a trial whose adapter exists reuses it); evaluation is
``evaluation_report``'s with the sweep's evaluation settings (cached too). The trial's MLflow run
is a child of the sweep's parent run: its settings, the loss curve and the figures the
comparison shows. A failed trial is recorded as failed (record, MLflow status) and fails its
partition only; the other trials go on.
"""

import base64
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.evaluation_report import EvaluationReportConfig, evaluate_or_reuse
from assets.lora_adapter import LoraAdapterConfig, train_or_reuse
from assets.sweep_plan import read_plan, sweep_dir
from pipeline.core.pool_limit import TRAINING_POOL
from pipeline.core.secrets import redact, redact_params
from pipeline.core.tracking_sync import send_missing_metrics
from pipeline.stages.alpaca_dataset import AlpacaDataset
from pipeline.stages.base_model import BaseModelInfo
from pipeline.stages.lora_adapter import LoraAdapter, plot_loss_curve, read_metrics
from pipeline.stages.sweep_plan import PARTITIONS, split_key
from pipeline.stages.sweep_trial import FAILED, FINISHED, trial_figures, write_record
from pipeline.stages.tokenized_dataset import TokenizedDataset
from resources.data_root import DataRoot
from resources.mlflow_tracking import MlflowTracking
from resources.training_launcher import TrainingLauncher

sweep_trials = DynamicPartitionsDefinition(name=PARTITIONS)


@asset(
    group_name="sweep",
    compute_kind="pytorch",
    description=__doc__,
    partitions_def=sweep_trials,
    deps=["sweep_plan"],
    pool=TRAINING_POOL,
)
def sweep_trial(
    context: AssetExecutionContext,
    data_root: DataRoot,
    mlflow: MlflowTracking,
    training_launcher: TrainingLauncher,
    alpaca_dataset: AlpacaDataset,
    tokenized_dataset: TokenizedDataset,
    base_model: BaseModelInfo,
) -> MaterializeResult:
    name, label = split_key(context.partition_key)
    plan = read_plan(data_root, name)
    if label not in plan["trials"]:
        raise Failure(
            description=f"trial {label!r} is not in sweep {name!r}'s plan (trials: {', '.join(plan['trials'])})"
        )
    settings = plan["trials"][label]
    folder = sweep_dir(data_root, name)
    client = mlflow.client()
    mlflow.check_reachable()
    child = _start_trial_run(context, client, plan["parent_run_id"], name, label, settings)
    try:
        config = LoraAdapterConfig(**settings)
        tags = {"medtune.sweep": name, "medtune.trial": label}
        adapter = train_or_reuse(
            context, config, data_root, mlflow, training_launcher, tokenized_dataset, base_model, extra_tags=tags
        ).value
        summary = evaluate_or_reuse(
            context.log,
            EvaluationReportConfig(**plan["evaluation"]),
            data_root,
            alpaca_dataset,
            tokenized_dataset,
            base_model,
            adapter,
        ).summary
    except BaseException as exc:
        reason = redact(getattr(exc, "description", None) or f"{type(exc).__name__}: {exc}")[:4000]
        write_record(folder, label, {"status": FAILED, "settings": settings, "error": reason, "mlflow_run_id": child})
        client.set_tag(child, "medtune.error", reason[:5000])
        client.set_terminated(child, "FAILED")
        context.log.error(f"trial {label} failed (recorded; the other trials go on): {reason[:500]}")
        raise Failure(description=f"trial {label} failed: {reason}") from None
    figures = trial_figures(adapter.figures, summary)
    metrics = read_metrics(Path(adapter.path) / "metrics.jsonl")
    numbers = _finish_trial_run(client, child, adapter, figures, metrics)
    record = {"status": FINISHED, "settings": settings, "adapter_id": adapter.adapter_id, "adapter_path": adapter.path}
    write_record(
        folder, label, {**record, "mlflow_run_id": child, "training_run_id": adapter.mlflow_run_id, "figures": figures}
    )
    png = plot_loss_curve(metrics)
    return MaterializeResult(
        metadata={
            "sweep": name,
            "trial": label,
            "method": settings.get("method", "lora"),
            "adapter_id": adapter.adapter_id,
            "adapter_path": MetadataValue.path(adapter.path),
            **{k: v for k, v in numbers.items()},
            "loss_curve": MetadataValue.md(f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})"),
            "mlflow_run": MetadataValue.url(mlflow.run_link(child, client.get_run(child).info.experiment_id)),
        }
    )


def _start_trial_run(context, client, parent: str, name: str, label: str, settings: dict) -> str:
    """The trial's MLflow run, a child of the sweep's, with its settings as params."""
    child = client.create_run(
        client.get_run(parent).info.experiment_id,
        tags={
            "mlflow.parentRunId": parent,
            "mlflow.runName": label,
            "medtune.sweep": name,
            "medtune.trial": label,
            "medtune.method": settings.get("method", "lora"),
            "dagster.run_id": context.run.run_id,
        },
    ).info.run_id
    for key, value in redact_params({"method": "lora", **settings}).items():
        client.log_param(child, key, str(value)[:250])
    context.log.info(f"sweep {name}, trial {label}: {settings} (MLflow run {child}, child of {parent})")
    return child


def _finish_trial_run(client, child: str, adapter: LoraAdapter, figures: dict, metrics: list) -> dict[str, float]:
    """The trial's loss curve, figures and adapter link sent to its MLflow run, then FINISHED; the numbers sent."""
    import time

    from mlflow.entities import Metric

    send_missing_metrics(client, child, metrics)
    now = int(time.time() * 1000)
    numbers = {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    client.log_batch(child, metrics=[Metric(k, v, now, 0) for k, v in numbers.items() if v == v])
    curve = Path(adapter.path) / "loss_curve.png"  # written by lora_adapter
    if curve.is_file():
        client.log_artifact(child, str(curve), "plots")
    client.set_tag(child, "medtune.adapter_id", adapter.adapter_id)
    client.set_tag(child, "medtune.training_run", adapter.mlflow_run_id or "")
    client.set_terminated(child, "FINISHED")
    return numbers
