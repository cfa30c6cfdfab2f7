"""A training's set-up: what it holds while it runs (``Training``, ``Progress``), the devices, rows,
step plan, model and optimizer (``set_up``), and where it resumes from (``resume``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stages.lora_adapter.batching import load_rows, plan_epoch, with_openings
from pipeline.stages.lora_adapter.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.stages.lora_adapter.report import Reporter, Throughput
from pipeline.stages.lora_adapter.spec import TrainSpec
from pipeline.stages.tokenized_dataset import IGNORE_INDEX


def step_groups(plan: list[list[int]], per_step: int) -> list[list[list[int]]]:
    """Micro-batches grouped per optimizer step; a short last group is filled from the epoch's start."""
    groups = [plan[i : i + per_step] for i in range(0, len(plan), per_step)]
    if groups and len(groups[-1]) < per_step:
        groups[-1] = groups[-1] + plan[: per_step - len(groups[-1])]
    return groups


@dataclass
class Training:
    """What one training holds while it runs: made by ``set_up``, moved on by the steps below."""

    spec: TrainSpec
    accelerator: Any
    report: Reporter
    tokenizer: Any
    train_rows: list
    eval_rows: list
    n_rows: int  # training rows before the opening copies
    lengths: list[int]
    total_steps: int
    steps_per_epoch: int
    precision: str
    on_gpu: bool
    attn: str
    checkpointing: bool
    peft_model: Any
    model: Any
    params: list
    optimizer: Any
    scheduler: Any
    trainable: int
    total_params: int
    flops: dict
    state: dict = field(default_factory=lambda: {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0})
    resumed_from: str | None = None

    @property
    def ckpt_root(self) -> Path:
        return Path(self.spec.checkpoint_dir)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        spec = self.spec
        plan = plan_epoch(
            self.lengths,
            spec.seed,
            epoch,
            packing=spec.packing,
            pack_tokens=spec.pack_tokens,
            batch_size=spec.per_device_batch_size,
        )
        return step_groups(plan, self.world * spec.gradient_accumulation_steps)


@dataclass
class Progress:
    """The loop's running figures between two log lines, and what it last measured."""

    start_step: int
    t_start: float
    speed: Throughput
    loss_sum: Any  # on the device: read back only at a log line
    t_log: float = 0.0
    tokens_since: int = 0
    steps_since: int = 0
    paused_at_log: float = 0.0  # evaluation and checkpoint time already left out of the tokens/s shown
    grad_norm: Any = None
    last_values: dict = field(default_factory=dict)
    last_eval: float | None = None


def set_up(spec: TrainSpec) -> Training:
    """Devices and precision, the rows and the step plan, the model with its adapter, the optimizer."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from pipeline.stages.lora_adapter.flops import mean_context, training_flops_per_token
    from pipeline.stages.lora_adapter.methods import PISSA_INIT, make_optimizer
    from pipeline.stages.lora_adapter.model import (
        SupervisedLM,
        causal_lm_of,
        load_for_training,
        resolve_precision,
        save_pissa_init,
        trainable_parameters,
    )

    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(spec.precision, on_gpu)
    accelerator = Accelerator(
        cpu=not on_gpu,
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
    )
    report = Reporter(spec, accelerator.is_main_process)
    set_seed(spec.seed)
    torch.use_deterministic_algorithms(not on_gpu, warn_only=True)

    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path, trust_remote_code=spec.trust_remote_code)
    train_rows = load_rows(spec.tokenized_path, "train", spec.max_seq_len)
    eval_rows = load_rows(spec.tokenized_path, "eval", spec.max_seq_len)
    if not train_rows:
        raise ValueError(f"no training rows in {spec.tokenized_path}")
    n_rows = len(train_rows)
    train_rows = with_openings(train_rows, spec.opening_tokens, spec.opening_repeats)
    lengths = [len(r[0]) for r in train_rows]
    per_step = accelerator.num_processes * spec.gradient_accumulation_steps
    plan = plan_epoch(
        lengths, spec.seed, 0, packing=spec.packing, pack_tokens=spec.pack_tokens, batch_size=spec.per_device_batch_size
    )
    steps_per_epoch = len(step_groups(plan, per_step))
    total_steps = spec.max_steps or max(1, math.ceil(steps_per_epoch * spec.epochs))

    peft_model, attn, checkpointing = load_for_training(spec, precision, on_gpu, total_steps)
    model = SupervisedLM(peft_model, attn, spec.logits_chunk_tokens, spec.method)
    trainable, total_params = trainable_parameters(peft_model)
    if spec.method == "pissa" and accelerator.is_main_process:
        save_pissa_init(peft_model, Path(spec.checkpoint_dir) / PISSA_INIT)
    supervised = sum(sum(1 for t in r[1][1:] if t != IGNORE_INDEX) for r in train_rows)
    flops = training_flops_per_token(
        causal_lm_of(peft_model).config,
        context=mean_context(lengths),
        supervised_share=supervised / sum(lengths),
        adapter_params=trainable,
        full=spec.method == "full",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec, params, on_gpu)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total_steps * spec.warmup_ratio), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Training(
        spec, accelerator, report, tokenizer, train_rows, eval_rows, n_rows, lengths, total_steps, steps_per_epoch,
        precision, on_gpu, attn, checkpointing, peft_model, model, params, optimizer, scheduler, trainable,
        total_params, flops,
    )  # fmt: skip


def resume(run: Training) -> None:
    """Continue from the latest complete checkpoint, if any (a damaged one is skipped for the one before)."""
    from pipeline.stages.lora_adapter.methods import optimizer_name

    spec, report = run.spec, run.report
    ckpt = latest_checkpoint(run.ckpt_root, warn=report.log)
    if ckpt is not None:
        run.state = load_checkpoint(ckpt, run.accelerator, run.model, run.optimizer, run.scheduler, spec.method)
        run.resumed_from = ckpt.name
        report.log(f"resuming from checkpoint {ckpt} (step {run.state['step']} of {run.total_steps})")
    per_step = f"packed to {spec.pack_tokens} tokens" if spec.packing else f"{spec.per_device_batch_size} rows"
    report.log(
        f"training {run.trainable:,} parameters of {run.total_params:,} ({spec.method}, optimizer "
        f"{optimizer_name(spec)}) on {run.n_rows} rows "
        f"(+{len(run.train_rows) - run.n_rows} answer openings, {len(run.eval_rows)} eval), "
        f"{run.world} process(es) on {run.accelerator.device}, {run.precision} base weights, attention {run.attn}, "
        f"{per_step} x{run.world}x{spec.gradient_accumulation_steps} per step; {run.total_steps} steps; "
        f"{run.flops['total'] / 1e9:.2f} GFLOP per token"
    )
