"""The training loop of ``lora_adapter``: plain PyTorch, with 🤗 Accelerate for device placement,
autocast, DDP/FSDP/DeepSpeed and gradient accumulation.

One optimizer step takes ``processes x gradient_accumulation_steps`` micro-batches of the epoch's
plan (pipeline.stages.lora_adapter.batching); each micro-batch is rows laid end to end, and its loss is the
mean cross-entropy over its supervised tokens (pipeline.stages.lora_adapter.loss). Nothing is read
back from the device between log lines: losses and gradient norms are summed where they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeline.stages.lora_adapter.batching import Batch, flatten, plan_epoch
from pipeline.stages.lora_adapter.checkpoint import (
    TrainingStopped,
    save_checkpoint,
    stop_requested,
)
from pipeline.stages.lora_adapter.finish import finish
from pipeline.stages.lora_adapter.report import Throughput
from pipeline.stages.lora_adapter.setup import Progress, Training, resume, set_up
from pipeline.stages.lora_adapter.spec import STOP_FILE, TrainSpec


def forward_losses(model, batch: Batch):
    return model(batch.input_ids, batch.position_ids, batch.positions, batch.targets, row_lengths=batch.row_lengths)


def evaluate(model, accelerator, rows, spec: TrainSpec) -> float | None:
    """Mean loss over every supervised eval token (all processes together)."""
    import torch

    if not rows:
        return None
    plan = plan_epoch([len(r[0]) for r in rows], 0, 0, packing=True, pack_tokens=spec.pack_tokens, batch_size=1)
    # the bare model, not the DDP wrapper: processes run different numbers of eval batches
    bare = accelerator.unwrap_model(model)
    bare.eval()
    total = torch.zeros(2, device=accelerator.device)
    # eager: compiling the no-grad graphs, then the training graphs again, costs more than the evaluation
    with torch.no_grad(), accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        for idx in plan[accelerator.process_index :: accelerator.num_processes]:
            batch = flatten([rows[i] for i in idx]).to(accelerator.device)
            losses = forward_losses(bare, batch)
            total += torch.stack([losses.sum(), torch.tensor(float(batch.supervised), device=losses.device)])
    total = accelerator.reduce(total, reduction="sum")
    bare.train()
    return (total[0] / total[1]).item() if total[1] > 0 else None


def train(spec: TrainSpec, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train the adapter ``spec`` describes and save it: set up, resume, evaluate, step, finish.
    ``on_step(step)`` is called as each step ends (tests use it to kill the process there)."""
    run = set_up(spec)
    resume(run)
    first_eval = evaluate_first(run)
    progress = run_steps(run, on_step or (lambda step: None))
    return finish(run, first_eval, progress)


def evaluate_first(run: Training) -> float | None:
    """The held-out loss before any training (a resumed training has it from its first run)."""
    if run.state["step"] != 0 or not run.eval_rows:
        return None
    loss = evaluate(run.model, run.accelerator, run.eval_rows, run.spec)
    run.report.metrics({"eval_loss": loss}, step=0)
    run.report.log(f"step 0/{run.total_steps} eval_loss {loss:.4f}")
    return loss


def run_steps(run: Training, on_step: Callable[[int], None]) -> Progress:
    """Optimizer steps to ``total_steps``, each followed by what is due: a log line, an evaluation,
    a checkpoint, a stop that was asked for."""
    import torch

    run.model.train()
    step, epoch, start_batch = run.state["step"], run.state["epoch"], run.state["batch_in_epoch"]
    now = time.perf_counter()
    sync = torch.cuda.synchronize if run.on_gpu else lambda: None
    progress = Progress(step, now, Throughput(sync), torch.zeros((), device=run.accelerator.device), t_log=now)
    while step < run.total_steps:
        groups = run.epoch_groups(epoch)
        for b in range(start_batch, len(groups)):
            step_tokens = optimizer_step(run, groups[b], step, progress)
            step += 1
            progress.steps_since, progress.tokens_since = progress.steps_since + 1, progress.tokens_since + step_tokens
            run.state.update(step=step, epoch=epoch, batch_in_epoch=b + 1, tokens=run.state["tokens"] + step_tokens)
            after_step(run, step, progress)
            on_step(step)
            if step >= run.total_steps:
                break
        else:
            epoch, start_batch = epoch + 1, 0
    run.accelerator.wait_for_everyone()
    return progress


def optimizer_step(run: Training, group: list[list[int]], step: int, progress: Progress) -> int:
    """One optimizer step over this process's share of ``group`` (micro-batches of row indexes); its tokens."""
    from pipeline.stages.lora_adapter.methods import after_optimizer_step, extra_loss

    spec, accelerator, model = run.spec, run.accelerator, run.model
    for idx in group[accelerator.process_index :: run.world]:
        batch = flatten([run.train_rows[i] for i in idx]).to(accelerator.device)
        with accelerator.accumulate(model):
            loss = forward_losses(model, batch).mean()
            regulariser = extra_loss(run.peft_model, spec.method)
            if regulariser is not None:
                loss = loss + regulariser
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                progress.grad_norm = accelerator.clip_grad_norm_(run.params, spec.max_grad_norm)
            run.optimizer.step()
            if accelerator.sync_gradients:
                run.scheduler.step()
                after_optimizer_step(run.peft_model, spec.method, step + 1)
            run.optimizer.zero_grad(set_to_none=True)
        progress.loss_sum += loss.detach() / spec.gradient_accumulation_steps
    tokens = sum(run.lengths[i] for micro in group for i in micro)
    progress.speed.step_done(tokens, sum(len(micro) for micro in group))
    return tokens


def after_step(run: Training, step: int, progress: Progress) -> None:
    spec = run.spec
    if step % spec.log_every == 0 or step == run.total_steps:
        log_progress(run, step, progress)
    if run.eval_rows and (step % spec.eval_every == 0 or step == run.total_steps):
        with progress.speed.excluding():
            progress.last_eval = evaluate(run.model, run.accelerator, run.eval_rows, spec)
        run.report.metrics({"eval_loss": progress.last_eval}, step=step)
        run.report.log(f"step {step}/{run.total_steps} eval_loss {progress.last_eval:.4f}")
    if step % spec.save_every == 0 and step < run.total_steps:
        with progress.speed.excluding():  # every process takes part; the main one writes
            removed = checkpoint(run, step)
            run.report.log(f"checkpoint saved at step {step}" + (f" (removed {', '.join(removed)})" if removed else ""))
    if step < run.total_steps and stop_requested(run.ckpt_root, run.accelerator):
        if step % spec.save_every != 0:
            checkpoint(run, step)
        why = (run.ckpt_root / STOP_FILE).read_text().strip() or "a stop was requested"
        run.report.log(f"stopping at step {step}: {why}")
        raise TrainingStopped(f"{why}; stopped at checkpoint step-{step}: the next materialization resumes from it")


def checkpoint(run: Training, step: int) -> list[str]:
    """Save ``step-N`` (model, optimizer, scheduler, random states); the names of those rotated out."""
    return save_checkpoint(
        run.ckpt_root / f"step-{step}",
        run.accelerator,
        run.model,
        run.optimizer,
        run.scheduler,
        run.state,
        run.spec.method,
        keep=run.spec.save_total_limit,
    )


def log_progress(run: Training, step: int, progress: Progress) -> None:
    """A log line and a metrics point: mean loss since the last line, learning rate, gradient norm, speed, ETA."""
    now = time.perf_counter()
    tps = progress.tokens_since / max(now - progress.t_log - (progress.speed.excluded - progress.paused_at_log), 1e-9)
    eta = (now - progress.t_start) / (step - progress.start_step) * (run.total_steps - step)
    loss_value = run.accelerator.reduce(progress.loss_sum, reduction="mean").item() / progress.steps_since
    values = {
        "train_loss": loss_value,
        "learning_rate": run.scheduler.get_last_lr()[0],
        "grad_norm": float(progress.grad_norm) if progress.grad_norm is not None else 0.0,
        "tokens_per_s": tps,
        "tflops": tps * run.flops["total"] / 1e12,
    }
    run.report.metrics(values, step=step)
    run.report.log(
        f"step {step}/{run.total_steps} loss {loss_value:.4f} lr {values['learning_rate']:.2e} "
        f"grad_norm {values['grad_norm']:.3f} {tps:,.0f} tokens/s ({values['tflops']:.3f} TFLOP/s) ETA {eta:,.0f}s"
    )
    progress.last_values = values
    progress.t_log, progress.tokens_since, progress.steps_since, progress.paused_at_log = (
        now,
        0,
        0,
        progress.speed.excluded,
    )
    progress.loss_sum.zero_()
