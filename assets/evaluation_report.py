"""Asset ``evaluation_report``: the base model against the tuned one on the same prompts
(``pipeline.stages.evaluation_report``).

Every eval row plus a fixed sample of train rows; loss and perplexity on held-out answer tokens
(the sample's too with ``train_sample_loss``), medicine-choice accuracy and mean rank by likelihood
(every medicine the data names, in the data's answer forms), batched greedy answers, BLEU-4 (characters), ROUGE-1/2/L
(jieba words), medicine-name hit
rate. The full side-by-side table goes to the training's MLflow run (CSV and JSON) with the summary
metrics as ``base_*`` / ``tuned_*`` (``tuned_eval_choice_accuracy``, ...). Check
``tuned_beats_base``, on held-out rows: loss lower, choice accuracy and ROUGE-L not lower.
Results are kept under ``$MEDTUNE_DATA_DIR/models/evaluations/<key>/`` and reused when the adapter
and the settings are unchanged.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from pipeline.core.atomic import atomic_dir, write_bytes_atomic
from pipeline.core.cache import KEY_CHARS, is_complete, keyed_folder
from pipeline.core.fingerprint import sha256_json
from pipeline.core.pool_limit import INFERENCE_POOL
from pipeline.core.tracking_sync import COMPLETE, attempt, pending, quick_http
from pipeline.stages.alpaca_dataset import AlpacaDataset
from pipeline.stages.base_model import BaseModelInfo
from pipeline.stages.evaluation_report import (
    EvalConfig,
    EvaluationReport,
    evaluate_models,
    extract_medicine_name,
    select_rows,
    side_by_side_markdown,
    summary_markdown,
    tuned_beats_base,
)
from pipeline.stages.evaluation_report.choice import ChoiceSet
from pipeline.stages.evaluation_report.lineage import LineageError, check_lineage
from pipeline.stages.evaluation_report.report import ROWS_TABLE, row_table
from pipeline.stages.evaluation_report.settings import EvaluationSettings
from pipeline.stages.lora_adapter import LoraAdapter
from pipeline.stages.lora_adapter.generation import eval_dtype, load_tuned_model, stop_token_ids
from pipeline.stages.tokenized_dataset import MANIFEST, TokenizedDataset
from resources.data_root import DataRoot
from resources.mlflow_tracking import MlflowTracking

EVAL_FORMAT = 3  # 3: one forward per row, choice over a token trie, the tuned LoRA model merged for the pass


class EvaluationReportConfig(Config, EvaluationSettings):
    """The evaluation's settings (declared in ``pipeline/stages/evaluation_report/settings.py``) and
    how many rows the UI previews."""

    preview_rows: int = Field(5, ge=0, description="Rows of the base-vs-tuned table shown in the UI")


def _log_to_mlflow(
    mlflow: MlflowTracking, run_id: str, folder: Path, metrics: dict[str, float], gate: tuple[bool, str]
) -> None:
    client = mlflow.client()
    for name in ("evaluation.csv", "evaluation.json", "summary.json"):
        client.log_artifact(run_id, str(folder / name), "evaluation")
    # the rows as an MLflow table: shown in the run's artifacts and compared across runs in the UI
    rows = row_table(pd.read_json(folder / "evaluation.json", orient="records"))
    client.log_table(run_id, data=rows, artifact_file=ROWS_TABLE)
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if v == v and abs(v) != float("inf")]
    )
    client.set_tag(run_id, "medtune.tuned_beats_base", str(gate[0]).lower())
    client.set_tag(run_id, "medtune.tuned_beats_base_reason", gate[1][:5000])


def evaluation_key(config: EvaluationReportConfig, adapter_id: str, tokenized_key: str, alpaca_fingerprint: str) -> str:
    """The evaluation's cache key: adapter, data and every setting but the preview length."""
    settings = {k: v for k, v in config.model_dump().items() if k != "preview_rows"}
    return sha256_json(
        {"format": EVAL_FORMAT, "adapter": adapter_id, "data": tokenized_key, "alpaca": alpaca_fingerprint, **settings}
    )


def _run_lacks_evaluation(mlflow: MlflowTracking, run_id: str) -> bool:
    """A kept evaluation whose MLflow run has none of it (a run copied into a new store): send it."""
    try:
        with quick_http():
            return "tuned_eval_loss" not in mlflow.client().get_run(run_id).data.metrics
    except Exception:  # the sending that follows says what failed
        return True


@asset(
    group_name="model",
    compute_kind="pytorch",
    description=__doc__,
    pool=INFERENCE_POOL,
    check_specs=[
        AssetCheckSpec(
            "tuned_beats_base",
            asset="evaluation_report",
            description="On held-out rows: tuned loss below the base model's, "
            "medicine-choice accuracy and ROUGE-L not lower",
        )
    ],
)
def evaluation_report(
    context: AssetExecutionContext,
    config: EvaluationReportConfig,
    data_root: DataRoot,
    mlflow: MlflowTracking,
    alpaca_dataset: AlpacaDataset,
    tokenized_dataset: TokenizedDataset,
    base_model: BaseModelInfo,
    lora_adapter: LoraAdapter,
):
    run_id = lora_adapter.mlflow_run_id
    done = evaluate_or_reuse(
        context.log, config, data_root, alpaca_dataset, tokenized_dataset, base_model, lora_adapter
    )
    folder, summary, cache_hit = done.folder, done.summary, done.cache_hit
    gate = tuned_beats_base(summary)
    metrics = {
        f"{m}_{s}_{k}": float(v)
        for m, splits in summary.items()
        for s, d in splits.items()
        for k, v in d.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    tracking = COMPLETE
    if run_id and (not cache_hit or pending(folder) or _run_lacks_evaluation(mlflow, run_id)):
        # the evaluation is on disk; if MLflow is away the next materialization sends it
        tracking = attempt(
            folder,
            "evaluation",
            mlflow.tracking_uri,
            run_id,
            lambda: _log_to_mlflow(mlflow, run_id, folder, metrics, gate),
        )
        if tracking != COMPLETE:
            context.log.warning(tracking)
        elif cache_hit:
            context.log.info(f"sent the evaluation kept in {folder} to MLflow run {run_id}")
    (context.log.info if gate[0] else context.log.warning)(
        f"tuned_beats_base: {'passed' if gate[0] else 'FAILED'}: {gate[1]}"
    )
    link = ""
    if run_id and tracking == COMPLETE:
        link = mlflow.run_link(run_id, mlflow.client().get_run(run_id).info.experiment_id)
    report = EvaluationReport(str(folder), done.key, summary, gate[0], gate[1], done.system_prompt, run_id, tracking)
    yield Output(report, metadata={**_metadata(done, config, metrics, link), "mlflow_tracking": tracking})
    b, t = summary.get("base", {}).get("eval", {}), summary.get("tuned", {}).get("eval", {})
    yield AssetCheckResult(
        check_name="tuned_beats_base",
        passed=gate[0],
        description=gate[1],
        metadata={
            "base_eval_loss": b.get("loss", float("nan")),
            "tuned_eval_loss": t.get("loss", float("nan")),
            "base_eval_choice_accuracy": _num(b.get("choice_accuracy")),
            "tuned_eval_choice_accuracy": _num(t.get("choice_accuracy")),
            "base_eval_rouge_l": b.get("rouge_l", float("nan")),
            "tuned_eval_rouge_l": t.get("rouge_l", float("nan")),
        },
    )


SHOWN_METRICS = (
    "eval_loss",
    "eval_rouge_l",
    "eval_name_hit_rate",
    "eval_choice",
    "eval_seen_medicine_choice",
    "train_sample_choice",
)


def _metadata(done: "Evaluated", config: EvaluationReportConfig, metrics: dict[str, float], link: str) -> dict:
    """What the asset shows: rows, the summary and side-by-side tables, the held-out figures, links."""
    table = done.table
    return {
        "cache_hit": done.cache_hit,
        "rows": len(table),
        "eval_rows": int((table["split"] == "eval").sum()),
        "train_sample_rows": int((table["split"] == "train_sample").sum()),
        "summary": MetadataValue.md(summary_markdown(done.summary)),
        "side_by_side": MetadataValue.md(side_by_side_markdown(table, config.preview_rows)),
        **{k: v for k, v in metrics.items() if k.split("_", 1)[1].startswith(SHOWN_METRICS)},
        "tuned_beats_base": tuned_beats_base(done.summary)[0],
        "path": MetadataValue.path(str(done.folder)),
        "mlflow_run": MetadataValue.url(link) if link else "",
    }


def _num(value) -> float:
    return float("nan") if value is None else float(value)


@dataclass(frozen=True)
class Evaluated:
    """An evaluation on disk: its keyed folder, the summary and per-row table, whether it was reused."""

    folder: Path
    key: str
    summary: dict
    table: pd.DataFrame
    cache_hit: bool
    system_prompt: str


def evaluate_or_reuse(
    log,
    config: EvaluationReportConfig,
    data_root: DataRoot,
    alpaca_dataset: AlpacaDataset,
    tokenized_dataset: TokenizedDataset,
    base_model: BaseModelInfo,
    lora_adapter: LoraAdapter,
) -> "Evaluated":
    """The evaluation of ``lora_adapter`` with ``config``: computed, or read back from its keyed folder.
    (Sweep trials call it too.)"""
    manifest = json.loads((Path(tokenized_dataset.path) / MANIFEST).read_text())
    try:
        check_lineage(
            alpaca_dataset.path, alpaca_dataset.data_fingerprint, tokenized_dataset.path, manifest, lora_adapter.path
        )
    except LineageError as exc:
        raise Failure(description=f"not evaluated: {exc}") from None
    settings = config.model_dump()
    key = evaluation_key(config, lora_adapter.adapter_id, tokenized_dataset.key, alpaca_dataset.data_fingerprint)
    folder = keyed_folder(data_root.models_dir / "evaluations", key)
    cache_hit = is_complete(folder, "summary.json")
    if cache_hit:
        log.info(f"cache hit: this adapter was already evaluated with these settings ({folder})")
        summary = json.loads((folder / "summary.json").read_text())["summary"]
        table = pd.read_json(folder / "evaluation.json", orient="records")
    else:
        alpaca = pd.read_parquet(alpaca_dataset.path)
        rows = select_rows(
            alpaca, {s: tokenized_dataset.load(s) for s in ("train", "eval")}, config.train_sample_size, config.seed
        )
        log.info(
            f"evaluating base and tuned models on {int((rows['split'] == 'eval').sum())} eval rows "
            f"and {int((rows['split'] == 'train_sample').sum())} sampled train rows"
        )
        dtype = eval_dtype(config.dtype)
        model, tokenizer = load_tuned_model(base_model.path, lora_adapter.path, base_model.trust_remote_code, dtype)
        log.info(f"evaluating in {dtype}")
        eval_cfg = _eval_config(log, config, alpaca, manifest["system_prompt"])
        # the base model's half depends on the base weights, the rows and the settings, not on the
        # adapter: kept apart and reused by the next adapter (a sweep's trials, a retraining)
        base_key = {
            "format": EVAL_FORMAT,
            "base": base_model.fingerprint,
            "data": tokenized_dataset.key,
            "alpaca": alpaca_dataset.data_fingerprint,
            **settings,
        }
        base_file = data_root.models_dir / "evaluations" / f"base-{sha256_json(base_key)[:KEY_CHARS]}.json"
        earlier = json.loads(base_file.read_text()) if base_file.is_file() else None
        result = evaluate_models(
            model, tokenizer, rows, eval_cfg, stop_token_ids(tokenizer), log=log.info, base=earlier
        )
        summary, table = result.summary, result.table
        if earlier is None:
            write_bytes_atomic(base_file, json.dumps(result.base, ensure_ascii=False, default=_plain).encode())
        record = {
            "adapter_id": lora_adapter.adapter_id,
            "settings": settings,
            "system_prompt": manifest["system_prompt"],
        }
        with atomic_dir(folder) as tmp:
            table.to_csv(tmp / "evaluation.csv", index=False)
            table.to_json(tmp / "evaluation.json", orient="records", force_ascii=False, indent=1)
            summary_json = {"summary": summary, "metrics": result.flat_metrics(), **record}
            (tmp / "summary.json").write_text(json.dumps(summary_json, ensure_ascii=False, indent=2))
    return Evaluated(folder, key, summary, table, cache_hit, manifest["system_prompt"])


def _eval_config(log, config: EvaluationReportConfig, alpaca: pd.DataFrame, system_prompt: str) -> EvalConfig:
    """The evaluation's settings with what the data gives: the candidate medicines and those trained on."""
    choices = ChoiceSet.from_answers(alpaca["output"].tolist()) if config.choice_scoring else None
    if choices:
        log.info(f"medicine choice: {len(choices.candidates)} candidate medicines, answer forms {choices.forms}")
    elif config.choice_scoring:
        log.warning("medicine choice not scored: the answers name fewer than two medicines in a known form")
    train_medicines = frozenset(alpaca.loc[alpaca["split"] == "train", "output"].map(extract_medicine_name).dropna())
    return EvalConfig(
        **config.model_dump(include=set(EvaluationSettings.model_fields)),
        system_prompt=system_prompt,
        choices=choices or None,
        train_medicines=train_medicines,
    )


def _plain(value):
    """numpy scalars in the table (ranks, counts) as plain JSON numbers."""
    return value.item() if hasattr(value, "item") else str(value)
