"""The training child's settings (``TrainSpec``), written by the ``lora_adapter`` asset as JSON, and
the cache key of a training (``adapter_id``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainSpec:
    """Every training setting and its default, declared once: the ``lora_adapter`` asset's config
    takes its defaults from here. The defaults are the offline CPU demo's, chosen by the measured
    sweep in the README ("Choosing the defaults"); GPU presets change them."""

    base_model_path: str
    tokenized_path: str
    output_dir: str  # the finished adapter goes here (atomically)
    checkpoint_dir: str  # step-N/ folders
    method: str = (
        "lora"  # see pipeline.stages.lora_adapter.methods: lora dora rslora pissa loha lokr adalora ia3 prompt_tuning prefix_tuning p_tuning full
    )
    r: int = 64  # measured: held-out loss 1.90 -> 1.61 (real sample), 1.27 -> 1.15 (demo) against r 16, same speed
    lora_alpha: int = 128  # alpha / r = 2
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    # method-specific settings (read only by the methods that name them)
    num_virtual_tokens: int = 20  # prompt_tuning, prefix_tuning, p_tuning
    prompt_encoder_hidden_size: int = 128  # p_tuning's MLP
    adalora_init_r: int | None = None  # adalora: starting rank (None: 1.5 x r); r is the target rank
    adalora_tinit: float = 0.1  # adalora: share of the steps before the rank budget starts to fall
    adalora_tfinal: float = 0.2  # adalora: share of the steps at the end with ranks fixed
    adalora_delta_t: int = 10  # adalora: steps between two rank reallocations
    adalora_orth_reg_weight: float = 0.5
    quantization: str = "none"  # none | nf4 (QLoRA: the frozen base in 4-bit NF4 through bitsandbytes; CUDA only)
    optimizer: str = "auto"  # auto (adamw; adafactor for full) | adamw | adafactor | adamw_8bit
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 2.0  # with opening_repeats 4: each case's opening trained 10 times (docs/training.md#choosing-the-defaults)
    # with packing each step takes rows (in a seeded shuffled order) until the next would pass
    # pack_tokens; without, per_device_batch_size rows. Either way the rows are laid end to end
    # without padding and attend only to themselves (pipeline.stages.lora_adapter.attention). The CPU demo
    # trains one row a step: the number of steps each case is seen in decides what it learns.
    packing: bool = False
    pack_tokens: int = 4096
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    seed: int = 42
    max_seq_len: int = 2048  # not a training setting: the asset passes the tokenized dataset's (its manifest)
    # The answer's opening (its first opening_tokens tokens, where the answer names its medicine):
    # each epoch also trains opening_repeats copies of every row cut there. A cut copy ends without
    # an end-of-turn token, so nothing in it teaches the model to stop early.
    opening_tokens: int = 32
    opening_repeats: int = 4
    precision: str = "auto"  # auto | bf16 | fp16 | fp32: the frozen base weights' dtype and the autocast dtype
    gradient_checkpointing: bool | None = None  # None: on for GPU, off for CPU
    attn_implementation: str = "auto"  # auto: packed rows (SDPA per row); or flash_attention_2 where installed
    compile: bool | None = None  # torch.compile the MLPs and norms; None: on for CPU (measured faster), off for GPU
    logits_chunk_tokens: int = 1024  # supervised positions projected onto the vocabulary at a time
    log_every: int = 5
    eval_every: int = 200  # each evaluation of the 5 real-sample eval rows costs ~9 s on 2 cores (4 s: the demo's 7)
    save_every: int = 100  # a checkpoint of the default adapter (r 64) with its optimizer state: 234 MB, ~1 s
    save_total_limit: int = 2  # complete checkpoints kept (the newest); older ones removed once a new one is complete
    trust_remote_code: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    stop_after_steps: int | None = None  # tests: stop (as if killed) after this many steps
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainSpec:
        return cls(**json.loads(Path(path).read_text()))

    def dump(self, path: str | os.PathLike) -> None:
        from pipeline.core.atomic import write_bytes_atomic

        write_bytes_atomic(path, json.dumps(asdict(self), indent=2).encode())


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
    fields = TrainSpec.__dataclass_fields__
    chosen.update({k: settings[k] for k in METHOD_KEYS if k in settings and settings[k] != fields[k].default})
    return sha256_json({"engine": ENGINE_VERSION, "data": data_fingerprint, "base": base_fingerprint, "settings": chosen, "processes": processes})[
        :16
    ]


def trained_method(folder: str | Path) -> str:
    """The method a training folder holds (its training record; else what its files show)."""
    folder = Path(folder)
    record = folder / TRAINING_RECORD
    if record.is_file():
        return json.loads(record.read_text())["spec"].get("method", "lora")
    if (folder / "adapter_config.json").is_file():
        peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type", "LORA")
        return {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning", "P_TUNING": "p_tuning"}.get(peft_type, peft_type.lower())
    return "full"
