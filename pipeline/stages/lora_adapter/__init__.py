"""Stage (asset ``lora_adapter``): LoRA fine-tuning, as a child process the asset starts.

    python -m pipeline.stages.lora_adapter --spec spec.json                          # one process
    torchrun --nproc_per_node 2 -m pipeline.stages.lora_adapter --spec spec.json      # DDP (gloo on CPU, NCCL on GPU)
    accelerate launch --config_file fsdp.yaml -m pipeline.stages.lora_adapter --spec spec.json

The spec (written by the asset) names the tokenized dataset, the base model, the output and
checkpoint folders and the training settings. The package, one concern a module:

- ``spec``: the settings (``TrainSpec``) and the cache key of a training (``adapter_id``);
- ``batching``: which rows each step takes (packed to a token budget), laid end to end without padding;
- ``attention``: attention that keeps every packed row to itself;
- ``loss``: cross-entropy at supervised positions only, the vocabulary projection in chunks;
- ``model``: the base model in its training precision with the LoRA adapter;
- ``loop``: the training loop (resume, evaluation, checkpoints, progress);
- ``checkpoint``, ``report``: checkpoints written atomically; progress to Pipes, stdout, MLflow;
- ``flops``: FLOPs per token from the model's config and the matmul peak, for MFU.
"""

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.tracking_sync import COMPLETE
from pipeline.stages.lora_adapter.report import plot_loss_curve, read_metrics
from pipeline.stages.lora_adapter.spec import STOP_FILE, TRAINING_KEYS, TRAINING_RECORD, TrainSpec, adapter_id

ERROR_FILE = "error.txt"

__all__ = [
    "ERROR_FILE",
    "LoraAdapter",
    "STOP_FILE",
    "TRAINING_KEYS",
    "TRAINING_RECORD",
    "TrainSpec",
    "adapter_id",
    "plot_loss_curve",
    "read_metrics",
    "train",
]


@dataclass(frozen=True)
class LoraAdapter:
    """What ``lora_adapter`` hands on: the adapter's folder and id, its MLflow run, and the training's
    figures (steps, losses, tokens/s, MFU, memory: the child's report)."""

    adapter_id: str
    path: str
    method: str
    mlflow_run_id: str | None = None
    mlflow_tracking: str = COMPLETE
    figures: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_plain(cls, value: dict[str, Any]) -> "LoraAdapter":
        """A descriptor written as one flat dict: the training's figures beside the adapter's fields."""
        own = {"adapter_id", "path", "method", "mlflow_run_id", "mlflow_tracking"}
        kept = {k: v for k, v in value.items() if k in own}
        return cls(**{"method": "lora", **kept}, figures={k: v for k, v in value.items() if k not in own})


def train(spec: TrainSpec, on_step=None) -> dict:
    """Train and save the adapter ``spec`` describes (``loop.train``); ``on_step(step)`` as each step ends."""
    from pipeline.stages.lora_adapter.loop import train as train_in_loop

    return train_in_loop(spec, on_step)
