"""Asset ``lora_adapter``: fine-tuning (LoRA by default; ``method`` picks another) in a child process started through
Dagster Pipes (``pipeline.stages.lora_adapter``).

One process by default; with ``num_processes`` > 1 the same entry point runs under ``torchrun``
(DDP), or ``accelerate launch`` with ``accelerate_config`` (FSDP, DeepSpeed). Same data, base weights
and settings as a finished training: the adapter is reused (a cache hit, linked to the MLflow run it
came from). An interrupted training of the same inputs resumes from its latest checkpoint.
"""

import base64
import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dagster import (
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from pipeline.core.atomic import file_lock, write_bytes_atomic
from pipeline.core.cache import is_complete, keyed_folder
from pipeline.core.lineage import DataFile, log_data_inputs
from pipeline.core.pool_limit import TRAINING_POOL, pool_slot
from pipeline.core.secrets import environment, redact
from pipeline.core.tracking_sync import (
    COMPLETE,
    COPIED_FROM_TAG,
    MetricsTail,
    attempt,
    known_run,
    pending,
    quick_http,
    send_training,
    unfinished,
)
from pipeline.stages.base_model import BaseModelInfo
from pipeline.stages.lora_adapter import (
    ERROR_FILE,
    STOP_FILE,
    TRAINING_RECORD,
    LoraAdapter,
    TrainSpec,
    adapter_id,
    plot_loss_curve,
    read_metrics,
)
from pipeline.stages.lora_adapter.checkpoint import stop_request
from pipeline.stages.lora_adapter.distributed import LaunchError, check_accelerate_config, preset_path
from pipeline.stages.lora_adapter.distributed import launch_command as stage_launch_command
from pipeline.stages.lora_adapter.report import MissingReport, child_report
from pipeline.stages.lora_adapter.spec import TrainingSettings, adapter_lock
from pipeline.stages.tokenized_dataset import TokenizedDataset
from resources.data_root import PROJECT_ROOT, DataRoot
from resources.mlflow_tracking import MlflowTracking
from resources.training_launcher import TrainingLauncher


class LoraAdapterConfig(Config, TrainingSettings):
    """The training settings (declared in ``pipeline/stages/lora_adapter/spec.py``) and how the
    training is launched."""

    num_processes: int = Field(1, ge=1, description="Processes (GPUs); > 1 starts a distributed launcher")
    launcher: Literal["auto", "torchrun", "accelerate"] = Field(
        "auto",
        description=(
            "What starts the processes when there are several: auto is accelerate with accelerate_config, else torchrun"
        ),
    )
    num_nodes: int = Field(
        1, ge=1, description="Machines; each runs this launcher with its node_rank (torchrun/accelerate)"
    )
    node_rank: int = Field(0, ge=0, description="This machine's rank among num_nodes (0: the one that reports)")
    rdzv_endpoint: str | None = Field(
        None, description="HOST:PORT where the nodes meet (node 0's address); needed for num_nodes > 1"
    )
    accelerate_config: str | None = Field(
        None,
        description="accelerate config for `accelerate launch`: a preset (fsdp, deepspeed-zero2, deepspeed-zero3: "
        "pipeline/presets/accelerate/) or a file, relative to the data root",
    )
    allow_outside_paths: bool = Field(False, description="accelerate_config may lie outside the data root")


def launch_command(spec_path: Path, config: LoraAdapterConfig, run_id: str = "medtune") -> list[str]:
    names = ("num_processes", "launcher", "accelerate_config", "num_nodes", "node_rank", "rdzv_endpoint")
    return stage_launch_command(spec_path, run_id=run_id, **{name: getattr(config, name) for name in names})


def training_key(
    config: LoraAdapterConfig, tokenized_key: str, max_seq_len: int, base_fingerprint: str
) -> tuple[str, dict, dict]:
    """The adapter's id (its cache key), the settings as logged, and the training child's fields."""
    # the rows' length is tokenized_dataset's setting: read from its manifest, never asked again
    settings = {**config.model_dump(), "max_seq_len": max_seq_len}
    spec_fields = {k: v for k, v in settings.items() if k in TrainSpec.model_fields}
    # the key covers every training setting, the config's and the entry point's own defaults
    training = TrainSpec(
        base_model_path="", tokenized_path="", output_dir="", checkpoint_dir="", **spec_fields
    ).model_dump()
    return (
        adapter_id(tokenized_key, base_fingerprint, training, config.num_processes * config.num_nodes),
        settings,
        spec_fields,
    )


@asset(group_name="model", compute_kind="pytorch", description=__doc__, pool=TRAINING_POOL)
def lora_adapter(
    context: AssetExecutionContext,
    config: LoraAdapterConfig,
    data_root: DataRoot,
    mlflow: MlflowTracking,
    training_launcher: TrainingLauncher,
    tokenized_dataset: TokenizedDataset,
    base_model: BaseModelInfo,
) -> Output[LoraAdapter]:
    return train_or_reuse(context, config, data_root, mlflow, training_launcher, tokenized_dataset, base_model)


def train_or_reuse(
    context,
    config: LoraAdapterConfig,
    data_root: DataRoot,
    mlflow: MlflowTracking,
    training_launcher: TrainingLauncher,
    tokenized_dataset: TokenizedDataset,
    base_model: BaseModelInfo,
    extra_tags: dict[str, str] | None = None,
) -> Output[LoraAdapter]:
    """The adapter of ``config`` on these inputs: reused when already trained, else trained in a
    child process (resuming an interrupted training). Sweep trials call it too."""
    extra_tags = extra_tags or {}
    if config.accelerate_config:
        resolved = preset_path(config.accelerate_config) or data_root.confine(
            config.accelerate_config, "lora_adapter.accelerate_config", config.allow_outside_paths
        )
        try:
            import torch

            kind = check_accelerate_config(resolved, on_gpu=torch.cuda.is_available())
        except LaunchError as exc:
            raise Failure(description=f"not launched: {exc}") from None
        context.log.info(f"accelerate config {resolved} ({kind})")
        config = config.model_copy(update={"accelerate_config": str(resolved)})
    aid, settings, spec_fields = training_key(
        config, tokenized_dataset.key, tokenized_dataset.max_seq_len, base_model.fingerprint
    )
    job = Job(
        config,
        tokenized_dataset,
        base_model,
        settings,
        spec_fields,
        aid,
        keyed_folder(data_root.models_dir / "adapters", aid),
        keyed_folder(data_root.models_dir / "checkpoints", aid),
        extra_tags,
        str(data_root.root),
    )
    # one training per adapter at a time: a second materialization waits here, then finds it done (cache hit)
    with file_lock(
        adapter_lock(data_root.models_dir, aid),
        on_wait=lambda: context.log.info(f"another process is training adapter {aid}: waiting for it"),
    ):
        if is_complete(job.out_dir, TRAINING_RECORD):
            return _reuse(context, mlflow, job)
        lost = stop_request(job.ckpt_dir, f"the lock of the {TRAINING_POOL} slot", context.log.error)
        with pool_slot(
            context.instance, TRAINING_POOL, context.log.info, on_lost=lost
        ):  # see pipeline/core/pool_limit.py
            return _train(context, mlflow, training_launcher, job)


@dataclass(frozen=True)
class Job:
    """One training of ``lora_adapter``: its settings, inputs, cache key and folders."""

    config: LoraAdapterConfig
    tokenized_dataset: TokenizedDataset
    base_model: BaseModelInfo
    settings: dict
    spec_fields: dict
    aid: str
    out_dir: Path
    ckpt_dir: Path
    extra_tags: dict[str, str]
    data_dir: str  # the data root: where a training pod mounts the team's data volume


def _reuse(context, mlflow: MlflowTracking, job: Job) -> Output[LoraAdapter]:
    aid, out_dir = job.aid, job.out_dir
    done = json.loads((out_dir / TRAINING_RECORD).read_text())
    run_id = done["spec"].get("mlflow_run_id")
    context.log.info(
        f"cache hit: adapter {aid} was trained on the same data, base model and settings (MLflow run {run_id})"
    )
    tracking = COMPLETE
    earlier = pending(out_dir)
    if run_id and not earlier:
        found = known_run(mlflow.client(), run_id, aid, context.log.warning)
        if found is None:  # trained under another MLflow store (a team's new one): a copy of the run here
            context.log.info(
                f"MLflow run {run_id} is not in {redact(mlflow.tracking_uri)}: copying the training's record there"
            )
            earlier = {"since": "the adapter was trained", "error": f"run {run_id} is in another store"}
            found = _start_run(context, mlflow, job, {COPIED_FROM_TAG: run_id})
        run_id = found
        status = unfinished(mlflow.client(), run_id) if run_id and not earlier else None
        if status:  # no marker: the process that trained it died before it could write one
            earlier = {
                "since": "the training's process ended early",
                "error": f"MLflow run {run_id} is {status}, not FINISHED",
            }
    if earlier and run_id:
        context.log.info(f"sending what MLflow missed since {earlier.get('since')} ({earlier.get('error', '')[:200]})")
        metrics = read_metrics(out_dir / "metrics.jsonl")
        send = lambda: send_training(mlflow.client(), run_id, out_dir, metrics, context.log.info)  # noqa: E731
        tracking = attempt(out_dir, "training run", mlflow.tracking_uri, run_id, send)
        _report_tracking(context, tracking)
    return _output(context, mlflow, aid, out_dir, done["result"], run_id, cache_hit=True, tracking=tracking)


def _train(context, mlflow: MlflowTracking, training_launcher: TrainingLauncher, job: Job) -> Output[LoraAdapter]:
    aid, out_dir, ckpt_dir = job.aid, job.out_dir, job.ckpt_dir
    mlflow.check_reachable()  # fail before training, naming the URI
    run_id = _start_run(context, mlflow, job)
    spec = TrainSpec(
        base_model_path=job.base_model.path,
        tokenized_path=job.tokenized_dataset.path,
        output_dir=str(out_dir),
        checkpoint_dir=str(ckpt_dir),
        trust_remote_code=job.base_model.trust_remote_code,
        mlflow_tracking_uri=redact(mlflow.tracking_uri),  # a password reaches the child in its environment only
        mlflow_run_id=run_id,
        **job.spec_fields,
    )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if any(ckpt_dir.glob("step-*/trainer_state.json")):
        context.log.info(
            f"an earlier training of adapter {aid} was interrupted: resuming from its latest checkpoint in {ckpt_dir}"
        )
    (ckpt_dir / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier training
    spec_path = ckpt_dir / "spec.json"
    spec.dump(spec_path)
    try:
        cmd = launch_command(spec_path, job.config, run_id=aid)
    except LaunchError as exc:
        raise Failure(description=f"not launched: {exc}") from None
    context.log.info("launching: " + " ".join(cmd))
    # the child talks to no tracking server: this process sends its metrics.jsonl lines as they come,
    # and if the server goes away mid-training the training keeps going, and so do we
    child_env = {**environment(), "PYTHONPATH": str(PROJECT_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    try:
        with MetricsTail(
            mlflow.client, run_id, ckpt_dir / "metrics.jsonl", context.log.warning
        ):  # live metrics in MLflow
            invocation = training_launcher.run(
                context, command=cmd, cwd=str(PROJECT_ROOT), env=child_env, data_dir=job.data_dir
            )
        reported = [
            r.metadata
            for r in invocation.get_results(implicit_materializations=False)
            if isinstance(r, MaterializeResult)
        ]
        result = child_report(
            reported, out_dir, context.log.warning
        )  # an implicit, empty result would hide a lost report
    except BaseException as exc:
        reason = _child_error(ckpt_dir)
        if not mlflow.mark_failed(run_id, Exception(reason) if reason else exc):
            context.log.warning(f"could not mark MLflow run {run_id} FAILED")
        if isinstance(exc, MissingReport):
            raise Failure(description=str(exc), metadata={"checkpoints": MetadataValue.path(str(ckpt_dir))}) from None
        if reason:
            raise Failure(
                description=f"training failed: {redact(reason)[:2000]}",
                metadata={"checkpoints": MetadataValue.path(str(ckpt_dir))},
            ) from exc
        raise
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the finished adapter supersedes its checkpoints
    # the adapter and its metrics are complete on disk; sending them to MLflow may fail on its own
    metrics = read_metrics(out_dir / "metrics.jsonl")
    write_bytes_atomic(out_dir / "loss_curve.png", png := plot_loss_curve(metrics))
    tracking = attempt(
        out_dir,
        "training run",
        mlflow.tracking_uri,
        run_id,
        lambda: send_training(mlflow.client(), run_id, out_dir, metrics, context.log.info),
    )
    _report_tracking(context, tracking)
    return _output(context, mlflow, aid, out_dir, result, run_id, cache_hit=False, png=png, tracking=tracking)


def _child_error(ckpt_dir: Path) -> str:
    with contextlib.suppress(OSError):
        return (ckpt_dir / ERROR_FILE).read_text()[:5000]
    return ""


def _start_run(context, mlflow: MlflowTracking, job: Job, more_tags: dict[str, str] | None = None) -> str:
    """A new MLflow run for the job's adapter: its tags (Dagster run, fingerprints, commit) and settings."""
    aid, method, base = job.aid, job.config.method, job.base_model
    tags = {
        "dagster.run_id": context.run.run_id,
        "dagster.asset_key": context.asset_key.to_user_string(),
        "medtune.adapter_id": aid,
    }
    tags |= {"medtune.data_fingerprint": job.tokenized_dataset.key, "medtune.base_model_fingerprint": base.fingerprint}
    tags |= {"medtune.base_model": base.model, "mlflow.runName": f"{method}-{aid}", "medtune.method": method}
    tags |= job.extra_tags | (more_tags or {})
    run_id = mlflow.start_run_with(tags, {**job.settings, "base_model": base.model})
    log_data_inputs(mlflow.client(), run_id, training_data(job.tokenized_dataset))
    return run_id


def training_data(tokenized: TokenizedDataset) -> list[DataFile]:
    """The tokenized splits a training reads, as the run's dataset inputs (digest: the data's key)."""
    return [
        DataFile(f"medtune-{split}", str(Path(tokenized.path) / f"{split}.parquet"), tokenized.key, context)
        for split, context in (("train", "training"), ("eval", "evaluation"))
    ]


def _report_tracking(context, tracking: str) -> None:
    if tracking != COMPLETE:
        context.log.warning(tracking)


# the training's figures shown in the asset's metadata, where the result has them
RESULT_SHOWN = (
    "steps train_seconds final_train_loss first_eval_loss final_eval_loss trained_tokens steady_tokens_per_s "
    "steady_rows_per_s flops_per_token"
    " achieved_tflops matmul_peak_tflops mfu processes device precision attention method optimizer"
    " trainable_parameters total_parameters adapter_bytes peak_rss_mb peak_gpu_mb resumed_from"
).split()


def _output(
    context, mlflow, aid, out_dir, result, run_id, cache_hit, png=None, tracking=COMPLETE
) -> Output[LoraAdapter]:
    if png is None:
        png = plot_loss_curve(read_metrics(out_dir / "metrics.jsonl"))
    exp_id = None
    with (
        contextlib.suppress(Exception),
        quick_http(),
    ):  # the link is a convenience; the tracking status says what failed
        exp_id = mlflow.client().get_run(run_id).info.experiment_id if run_id else None
    link = mlflow.run_link(run_id, exp_id) if run_id and exp_id else ""
    curve = out_dir / "loss_curve.png"
    if not curve.is_file():
        write_bytes_atomic(curve, png)
    md = {
        "cache_hit": cache_hit,
        "adapter_id": aid,
        "path": MetadataValue.path(str(out_dir)),
        "mlflow_run_id": run_id or "",
        "mlflow_run": MetadataValue.url(link) if link else "",
        "mlflow_store": redact(mlflow.tracking_uri),
        "mlflow_tracking": tracking,
        "loss_curve": MetadataValue.md(f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})"),
        "loss_curve_png": MetadataValue.path(str(curve)),
    }
    for key in RESULT_SHOWN:
        if result.get(key) is not None:
            md[key] = result[key]
    figures = {
        k: v for k, v in result.items() if k not in ("adapter_id", "path", "method", "mlflow_run_id", "mlflow_tracking")
    }
    method = result.get("method") or "lora"
    return Output(LoraAdapter(aid, str(out_dir), method, run_id, tracking, figures), metadata=md)
