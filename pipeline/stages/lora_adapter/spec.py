"""The training settings (``TrainingSettings``), the child's spec (``TrainSpec``), written by the
``lora_adapter`` asset as JSON, and the cache key of a training (``adapter_id``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.stages.lora_adapter.methods import METHODS


class TrainingSettings(BaseModel):
    """Every training setting, declared once: name, type, default, bounds and what it does. The
    ``lora_adapter`` asset's config is this class (with the launch settings); the child's spec adds
    the paths; ``docs/configuration.md`` is generated from it. The defaults are the offline CPU
    demo's ([choosing the defaults](../../../docs/training.md#choosing-the-defaults)); GPU presets
    change them."""

    model_config = ConfigDict(extra="forbid")

    method: Literal[METHODS] = Field(
        "lora", description="Fine-tuning method: " + ", ".join(METHODS) + " (docs/methods-and-sweeps.md)"
    )
    r: int = Field(64, gt=0, description="Rank (LoRA family, LoHa, LoKr; AdaLoRA's target rank)")
    lora_alpha: int = Field(
        128, gt=0, description="Scaling numerator (LoRA family, LoHa, LoKr, AdaLoRA): the update is scaled by alpha / r"
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input")
    target_modules: str = Field(
        "all-linear", description='"all-linear" or a comma-separated list such as "q_proj,v_proj"'
    )
    num_virtual_tokens: int = Field(20, gt=0, description="Virtual tokens of prompt_tuning, prefix_tuning and p_tuning")
    prompt_encoder_hidden_size: int = Field(128, gt=0, description="Width of p_tuning's prompt encoder MLP")
    adalora_init_r: int | None = Field(
        None, gt=0, description="adalora: starting rank (default 1.5 x r); r is the target rank"
    )
    adalora_tinit: float = Field(
        0.1, ge=0, lt=1, description="adalora: share of the steps before the rank budget starts to fall"
    )
    adalora_tfinal: float = Field(
        0.2, ge=0, lt=1, description="adalora: share of the steps at the end with ranks fixed"
    )
    adalora_delta_t: int = Field(10, gt=0, description="adalora: steps between two rank reallocations")
    adalora_orth_reg_weight: float = Field(0.5, ge=0, description="adalora: weight of the orthogonality regulariser")
    quantization: Literal["none", "nf4"] = Field(
        "none",
        description=(
            "nf4: QLoRA, the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); export merges into the "
            "full-precision base"
        ),
    )
    optimizer: Literal["auto", "adamw", "adafactor", "adamw_8bit"] = Field(
        "auto", description="auto: AdamW for adapters, Adafactor for full (its states fit beside the model)"
    )
    learning_rate: float = Field(
        1e-3, ge=0, description="Peak learning rate of the cosine schedule (0 leaves the adapters as initialised)"
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the steps spent warming the learning rate up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm")
    epochs: float = Field(2.0, gt=0, description="Passes over the training split")
    packing: bool = Field(
        False,
        description=(
            "Fill each step with rows up to pack_tokens, in a seeded shuffled order (else per_device_batch_size "
            "rows); rows are laid end to end without padding and attend only to themselves either way"
        ),
    )
    pack_tokens: int = Field(4096, gt=0, description="Token budget of one step and process when packing")
    per_device_batch_size: int = Field(1, gt=0, description="Rows per step and process without packing")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Steps whose gradients add up before one optimizer update"
    )
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (default: the epochs decide)"
    )
    seed: int = Field(42, ge=0, description="Seed of the adapters' initialisation, the row order and dropout")
    opening_tokens: int = Field(
        32, ge=0, description="The answer's opening: its first N tokens (where it names the medicine)"
    )
    opening_repeats: int = Field(
        4,
        ge=0,
        description="Extra copies of every row cut after its opening, trained each epoch "
        "(a cut copy has no end-of-turn token, so it teaches nothing about stopping)",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Dtype of the frozen base weights and of autocast (auto: bf16 where supported)"
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in the backward pass (default: on for GPU, off for CPU)"
    )
    attn_implementation: str = Field(
        "auto", description='"auto": packed rows, SDPA per row; or "flash_attention_2" where installed, "sdpa", "eager"'
    )
    compile: bool | None = Field(
        None, description="torch.compile the MLPs and norms (default: on for CPU, off for GPU)"
    )
    logits_chunk_tokens: int = Field(
        1024, gt=0, description="Supervised positions projected onto the vocabulary at a time (bounds memory)"
    )
    eval_every: int = Field(200, gt=0, description="Steps between two held-out loss evaluations")
    save_every: int = Field(
        100, gt=0, description="Steps between two checkpoints (model and optimizer state, to resume from)"
    )
    save_total_limit: int = Field(
        2, ge=2, description="Newest complete checkpoints kept (at least 2: a damaged one falls back to the one before)"
    )
    log_every: int = Field(5, gt=0, description="Steps between two logged loss points")


class TrainSpec(TrainingSettings):
    """What the training child gets (written by the ``lora_adapter`` asset as JSON): the settings,
    where to read and write, and what the asset knows for it."""

    base_model_path: str
    tokenized_path: str
    output_dir: str  # the finished adapter goes here (atomically)
    checkpoint_dir: str  # step-N/ folders
    max_seq_len: int = 2048  # the tokenized dataset's (its manifest): never asked again
    trust_remote_code: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainSpec:
        return cls(**json.loads(Path(path).read_text()))

    def dump(self, path: str | os.PathLike) -> None:
        from pipeline.core.atomic import write_bytes_atomic

        write_bytes_atomic(path, json.dumps(self.model_dump(), indent=2).encode())


# Settings that change what is trained (locations, logging, speed-only switches and test hooks do not).
TRAINING_KEYS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "epochs",
    "packing",
    "pack_tokens",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "seed",
    "max_seq_len",
    "opening_tokens",
    "opening_repeats",
    "precision",
    "gradient_checkpointing",
    "attn_implementation",
    "compile",
)
# Settings added after keys were in use: part of the key only when they differ from their default,
# so a LoRA training keeps the key (and the cached adapter) it had before they existed.
METHOD_KEYS = (
    "method",
    "num_virtual_tokens",
    "prompt_encoder_hidden_size",
    "adalora_init_r",
    "adalora_tinit",
    "adalora_tfinal",
    "adalora_delta_t",
    "adalora_orth_reg_weight",
    "optimizer",
    "quantization",
)
# Bump when the same settings would train differently (the engine changed what a step computes).
ENGINE_VERSION = 2


def adapter_lock(models_dir, adapter_id: str) -> Path:
    """The lock of one adapter: held while it is trained or its MLflow run completed
    (``lora_adapter``) and while it is registered (``registered_model``), so no process sees its
    run mid-way through another's work."""
    return Path(models_dir) / "checkpoints" / f"{adapter_id}.lock"


STOP_FILE = "stop-requested.txt"  # written by the asset (its reason inside): save a checkpoint and stop
TRAINING_RECORD = "medtune_training.json"  # written last into the adapter folder: the training finished


def adapter_id(data_fingerprint: str, base_fingerprint: str, settings: dict[str, Any], processes: int) -> str:
    """The cache key of a training: same data, base weights and settings → same adapter."""
    from pipeline.core.fingerprint import sha256_json

    chosen = {k: settings[k] for k in TRAINING_KEYS if k in settings}
    fields = TrainingSettings.model_fields
    chosen.update({k: settings[k] for k in METHOD_KEYS if k in settings and settings[k] != fields[k].default})
    return sha256_json(
        {
            "engine": ENGINE_VERSION,
            "data": data_fingerprint,
            "base": base_fingerprint,
            "settings": chosen,
            "processes": processes,
        }
    )[:16]


def trained_method(folder: str | Path) -> str:
    """The method a training folder holds (its training record; else what its files show)."""
    folder = Path(folder)
    record = folder / TRAINING_RECORD
    if record.is_file():
        return json.loads(record.read_text())["spec"].get("method", "lora")
    if (folder / "adapter_config.json").is_file():
        peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type", "LORA")
        return {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "P_TUNING": "p_tuning"}.get(
            peft_type, peft_type.lower()
        )
    return "full"
