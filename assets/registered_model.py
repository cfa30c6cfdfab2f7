"""Asset ``registered_model``: the merged model in the MLflow Model Registry (``pipeline.stages.registered_model``).

Registered only when both gates pass: ``tuned_beats_base`` (from ``evaluation_report``) and
``merged_matches_adapter`` (a blocking check on ``merged_model``: when it fails this asset does
not run). The new version, linked to the training's run, gets the alias ``challenger``; it takes
``champion`` when there is none or when it wins by ``promote_on`` (default: held-out loss must not
rise, then medicine-choice accuracy over the evaluated rows, then held-out ROUGE-L); the version's
description in MLflow gives the rule and the figures that decided. When a gate fails nothing
is registered, and the reason shows in the run's log, this asset's metadata and the MLflow run.
"""

from dagster import AssetExecutionContext, Config, Failure, MetadataValue, Output, asset

from pipeline.core.atomic import file_lock
from pipeline.core.secrets import redact
from pipeline.core.tracking_sync import COMPLETE, quick_http
from pipeline.stages.base_model import BaseModelInfo
from pipeline.stages.evaluation_report import EvaluationReport
from pipeline.stages.lora_adapter.spec import adapter_lock
from pipeline.stages.merged_model.record import MergedModel
from pipeline.stages.registered_model import (
    RegisteredModel,
    RegistrySettings,
    model_metrics,
    register_merged_model,
)
from resources.data_root import DataRoot
from resources.mlflow_tracking import MlflowTracking


class RegisteredModelConfig(Config, RegistrySettings):
    """The registry name, the served answer length and the champion rule
    (declared in ``pipeline.stages.registered_model.RegistrySettings``)."""


def version_figures(summary: dict) -> dict[str, float | None]:
    """What a version is judged on: held-out loss and ROUGE-L, and medicine-choice accuracy over every
    evaluated row where the data names a medicine (held-out and sampled training rows together)."""
    tuned = summary["tuned"]
    rows = correct = 0.0
    for split in tuned.values():
        if split.get("choice_accuracy") is not None and split.get("choice_rows"):
            rows += split["choice_rows"]
            correct += split["choice_accuracy"] * split["choice_rows"]
    return {
        "eval_loss": float(tuned["eval"]["loss"]),
        "choice_accuracy": round(correct / rows, 6) if rows else None,
        "rouge_l": float(tuned["eval"]["rouge_l"]),
    }


def _require_complete_tracking(
    mlflow: MlflowTracking, run_id: str, evaluation_report: EvaluationReport, merged_model: MergedModel
) -> None:
    """Registering needs the tracking server and a training run that holds everything: otherwise
    the run fails here, saying that the model is NOT registered, why, and what to do."""
    where = (
        f"the merged model is ready at {merged_model.path}"
        if merged_model.path
        else f"the adapter is ready at {merged_model.adapter_path}"
    )
    try:
        with quick_http():
            mlflow.check_reachable()
            run = mlflow.client().get_run(run_id)
    except Exception as exc:
        raise Failure(
            description=f"NOT registered: MLflow at {redact(mlflow.tracking_uri)} is unreachable "
            f"({redact(exc)[:300]}); {where}. Materialize again once the server is back: it registers then.",
            metadata={"registered": False, "mlflow_store": redact(mlflow.tracking_uri)},
        ) from None
    missing = []
    if run.info.status != "FINISHED":
        missing.append(
            f"the training's MLflow run {run_id} is {run.info.status}, not FINISHED (its metrics or adapter were not "
            "all sent)"
        )
    if evaluation_report.mlflow_tracking != COMPLETE:
        missing.append("the evaluation was not logged to MLflow")
    if missing:
        raise Failure(
            description="NOT registered: " + "; ".join(missing) + f"; {where}. Materialize the pipeline again: "
            "lora_adapter and evaluation_report send what MLflow is missing, then this registers.",
            metadata={"registered": False},
        )


@asset(group_name="model", compute_kind="mlflow", description=__doc__)
def registered_model(
    context: AssetExecutionContext,
    config: RegisteredModelConfig,
    mlflow: MlflowTracking,
    data_root: DataRoot,
    evaluation_report: EvaluationReport,
    merged_model: MergedModel,
    base_model: BaseModelInfo,
) -> Output[RegisteredModel]:
    run_id = merged_model.mlflow_run_id
    reasons = []
    if not evaluation_report.gate_passed:
        reasons.append(f"tuned_beats_base failed: {evaluation_report.gate_reason}")
    if not merged_model.verification["passed"]:
        reasons.append("merged_matches_adapter failed")
    if not run_id:
        reasons.append("the adapter has no MLflow run to link to")
    if reasons:
        reason = "; ".join(reasons)
        context.log.warning(f"NOT registered: {reason}")
        if run_id:
            mlflow.client().set_tag(run_id, "medtune.registration", f"skipped: {reason}"[:5000])
        return Output(
            RegisteredModel(False, config.model_name, reason),
            metadata={"registered": False, "reason": reason, "model_name": config.model_name},
        )
    # another run may be completing or registering this adapter's MLflow run: one at a time
    with file_lock(
        adapter_lock(data_root.models_dir, merged_model.adapter_id),
        on_wait=lambda: context.log.info("waiting for another run of this adapter"),
    ):
        return _register(context, config, mlflow, evaluation_report, merged_model, base_model, run_id)


def _register(
    context,
    config: RegisteredModelConfig,
    mlflow: MlflowTracking,
    evaluation_report: EvaluationReport,
    merged_model: MergedModel,
    base_model,
    run_id: str,
) -> Output[RegisteredModel]:
    _require_complete_tracking(mlflow, run_id, evaluation_report, merged_model)
    summary = evaluation_report.summary
    tuned, base = summary["tuned"]["eval"], summary["base"]["eval"]
    tags = {
        "medtune.data_fingerprint": mlflow.client().get_run(run_id).data.tags.get("medtune.data_fingerprint", ""),
        "medtune.base_model": base_model.model,
        "medtune.base_model_fingerprint": base_model.fingerprint,
        "medtune.adapter_id": merged_model.adapter_id,
        "tuned_eval_loss": f"{tuned['loss']:.6f}",
        "base_eval_loss": f"{base['loss']:.6f}",
        "tuned_eval_rouge_l": f"{tuned['rouge_l']:.4f}",
        "base_eval_rouge_l": f"{base['rouge_l']:.4f}",
        "tuned_eval_bleu_4": f"{tuned['bleu_4']:.4f}",
    }
    reg = register_merged_model(
        mlflow.tracking_uri,
        name=config.model_name,
        merged_dir=merged_model.path,
        merged_id=merged_model.merged_id,
        run_id=run_id,
        figures=version_figures(summary),
        tags=tags,
        system_prompt=evaluation_report.system_prompt,
        max_new_tokens=config.max_new_tokens,
        promote_on=config.promote_on,
        model_metrics=model_metrics(summary),
        adapter_dir=merged_model.adapter_path,
        base_dir=merged_model.base_model_path,
    )
    what = "already registered as" if reg.reused else "registered as"
    champ = (
        (
            "took the alias champion"
            + (f" from version {reg.previous_champion}" if reg.previous_champion else "")
            + f": {reg.decided_by}"
        )
        if reg.became_champion
        else (f"champion stays with version {reg.previous_champion}: {reg.decided_by}")
    )
    context.log.info(f"{what} {reg.name} version {reg.version} ({', '.join(reg.aliases) or 'no aliases'}); {champ}")
    mlflow.client().set_tag(run_id, "medtune.registration", f"{reg.name} version {reg.version}")
    return Output(
        RegisteredModel(True, **reg.as_dict()),
        metadata={
            "registered": True,
            "model_name": reg.name,
            "version": reg.version,
            "aliases": ", ".join(reg.aliases),
            "became_champion": reg.became_champion,
            "previous_champion": reg.previous_champion or "",
            "model_uri": reg.model_uri,
            "champion_uri": MetadataValue.text(f"models:/{reg.name}@champion"),
            "tuned_eval_rouge_l": float(tuned["rouge_l"]),
            "promote_on": ", ".join(config.promote_on),
            "decided_by": reg.decided_by,
        },
    )
