"""The training loop of ``lora_adapter``: plain PyTorch, with 🤗 Accelerate for device placement,
autocast, DDP/FSDP/DeepSpeed and gradient accumulation.

One optimizer step takes ``processes x gradient_accumulation_steps`` micro-batches of the epoch's
plan (pipeline.stages.lora_adapter.batching); each micro-batch is rows laid end to end, and its loss is the
mean cross-entropy over its supervised tokens (pipeline.stages.lora_adapter.loss). Nothing is read
back from the device between log lines: losses and gradient norms are summed where they are.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from pipeline.stages.lora_adapter.batching import Batch, flatten, load_rows, plan_epoch, with_openings
from pipeline.stages.lora_adapter.checkpoint import (
    TrainingStopped,
    gathered_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    stop_requested,
)
from pipeline.stages.lora_adapter.report import Reporter, Throughput
from pipeline.stages.lora_adapter.spec import STOP_FILE, TRAINING_RECORD, TrainSpec
from pipeline.stages.tokenized_dataset import IGNORE_INDEX


def peak_rss_mb() -> float | None:
    """This process's peak resident set (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: Linux carries that
    across ``exec``, so a child started by a large process (Dagster) would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def step_groups(plan: list[list[int]], per_step: int) -> list[list[list[int]]]:
    """Micro-batches grouped per optimizer step; a short last group is filled from the epoch's start."""
    groups = [plan[i : i + per_step] for i in range(0, len(plan), per_step)]
    if groups and len(groups[-1]) < per_step:
        groups[-1] = groups[-1] + plan[: per_step - len(groups[-1])]
    return groups


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
    # eager: compiling the no-grad graphs, then the training graphs again after them, cost more than
    # the whole evaluation (measured: the 10 steps after each evaluation ran at ~2/3 speed)
    with torch.no_grad(), accelerator.autocast(), torch.compiler.set_stance("force_eager"):
        for idx in plan[accelerator.process_index :: accelerator.num_processes]:
            batch = flatten([rows[i] for i in idx]).to(accelerator.device)
            losses = forward_losses(bare, batch)
            total += torch.stack([losses.sum(), torch.tensor(float(batch.supervised), device=losses.device)])
    total = accelerator.reduce(total, reduction="sum")
    bare.train()
    return (total[0] / total[1]).item() if total[1] > 0 else None


def train(spec: TrainSpec) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from pipeline.stages.lora_adapter.flops import matmul_peak_flops, mean_context, training_flops_per_token
    from pipeline.stages.lora_adapter.methods import PISSA_INIT, after_optimizer_step, extra_loss, make_optimizer, optimizer_name
    from pipeline.stages.lora_adapter.model import (
        DTYPES,
        SupervisedLM,
        causal_lm_of,
        load_for_training,
        resolve_precision,
        save_pissa_init,
        save_trained,
        trainable_parameters,
    )

    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(spec.precision, on_gpu)
    accelerator = Accelerator(
        cpu=not on_gpu, mixed_precision={"fp32": "no"}.get(precision, precision), gradient_accumulation_steps=spec.gradient_accumulation_steps
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
    world = accelerator.num_processes
    per_step = world * spec.gradient_accumulation_steps

    def epoch_groups(epoch: int) -> list[list[list[int]]]:
        plan = plan_epoch(lengths, spec.seed, epoch, packing=spec.packing, pack_tokens=spec.pack_tokens, batch_size=spec.per_device_batch_size)
        return step_groups(plan, per_step)

    steps_per_epoch = len(epoch_groups(0))
    total_steps = spec.max_steps or max(1, math.ceil(steps_per_epoch * spec.epochs))

    method = spec.method
    peft_model, attn, checkpointing = load_for_training(spec, precision, on_gpu, total_steps)
    model = SupervisedLM(peft_model, attn, spec.logits_chunk_tokens, method)
    trainable, total_params = trainable_parameters(peft_model)
    ckpt_root = Path(spec.checkpoint_dir)
    if method == "pissa" and accelerator.is_main_process:
        save_pissa_init(peft_model, ckpt_root / PISSA_INIT)

    supervised = sum(sum(1 for t in r[1][1:] if t != IGNORE_INDEX) for r in train_rows)
    flops = training_flops_per_token(
        causal_lm_of(peft_model).config,
        context=mean_context(lengths),
        supervised_share=supervised / sum(lengths),
        adapter_params=trainable,
        full=method == "full",
    )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec, params, on_gpu)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total_steps * spec.warmup_ratio), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0}
    resumed_from, ckpt = None, latest_checkpoint(ckpt_root, warn=report.log)
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, model, optimizer, scheduler, method)
        resumed_from = ckpt.name
        report.log(f"resuming from checkpoint {ckpt} (step {state['step']} of {total_steps})")
    report.log(
        f"training {trainable:,} parameters of {total_params:,} ({method}, optimizer {optimizer_name(spec)}) on {n_rows} rows "
        f"(+{len(train_rows) - n_rows} answer openings, {len(eval_rows)} eval), "
        f"{world} process(es) on {accelerator.device}, {precision} base weights, attention {attn}, "
        f"{'packed to ' + str(spec.pack_tokens) + ' tokens' if spec.packing else str(spec.per_device_batch_size) + ' rows'} "
        f"x{world}x{spec.gradient_accumulation_steps} per step; {total_steps} steps; "
        f"{flops['total'] / 1e9:.2f} GFLOP per token"
    )

    first_eval = last_eval = None
    if state["step"] == 0 and eval_rows:
        first_eval = evaluate(model, accelerator, eval_rows, spec)
        report.metrics({"eval_loss": first_eval}, step=0)
        report.log(f"step 0/{total_steps} eval_loss {first_eval:.4f}")

    model.train()
    step, epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
    start_step, t_start = step, time.perf_counter()
    t_log, tokens_since, steps_since = t_start, 0, 0
    speed = Throughput(torch.cuda.synchronize if on_gpu else lambda: None)
    paused_at_log = 0.0  # evaluation and checkpoint time already left out of the tokens/s shown
    loss_sum = torch.zeros((), device=accelerator.device)
    grad_norm = None
    while step < total_steps:
        groups = epoch_groups(epoch)
        for b in range(start_batch, len(groups)):
            step_tokens = sum(lengths[i] for micro in groups[b] for i in micro)
            step_rows = sum(len(micro) for micro in groups[b])
            for idx in groups[b][accelerator.process_index :: world]:
                batch = flatten([train_rows[i] for i in idx])
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):
                    loss = forward_losses(model, batch).mean()
                    regulariser = extra_loss(peft_model, method)
                    if regulariser is not None:
                        loss = loss + regulariser
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, spec.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                        after_optimizer_step(peft_model, method, step + 1)
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach() / spec.gradient_accumulation_steps
            speed.step_done(step_tokens, step_rows)
            step, steps_since, tokens_since = step + 1, steps_since + 1, tokens_since + step_tokens
            state.update(step=step, epoch=epoch, batch_in_epoch=b + 1, tokens=state["tokens"] + step_tokens)
            if step % spec.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_log - (speed.excluded - paused_at_log), 1e-9)
                eta = (now - t_start) / (step - start_step) * (total_steps - step)
                loss_value = accelerator.reduce(loss_sum, reduction="mean").item() / steps_since
                values = {
                    "train_loss": loss_value,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                    "tokens_per_s": tps,
                    "tflops": tps * flops["total"] / 1e12,
                }
                report.metrics(values, step=step)
                report.log(
                    f"step {step}/{total_steps} loss {loss_value:.4f} lr {values['learning_rate']:.2e} "
                    f"grad_norm {values['grad_norm']:.3f} {tps:,.0f} tokens/s "
                    f"({values['tflops']:.3f} TFLOP/s) ETA {eta:,.0f}s"
                )
                t_log, tokens_since, steps_since, paused_at_log = now, 0, 0, speed.excluded
                loss_sum.zero_()
            if eval_rows and (step % spec.eval_every == 0 or step == total_steps):
                with speed.excluding():
                    last_eval = evaluate(model, accelerator, eval_rows, spec)
                report.metrics({"eval_loss": last_eval}, step=step)
                report.log(f"step {step}/{total_steps} eval_loss {last_eval:.4f}")
            if step % spec.save_every == 0 and step < total_steps:
                with speed.excluding():  # every process takes part; the main one writes
                    removed = save_checkpoint(
                        ckpt_root / f"step-{step}", accelerator, model, optimizer, scheduler, state, method, keep=spec.save_total_limit
                    )
                    report.log(f"checkpoint saved at step {step}" + (f" (removed {', '.join(removed)})" if removed else ""))
            if step < total_steps and stop_requested(ckpt_root, accelerator):
                if step % spec.save_every != 0:
                    save_checkpoint(ckpt_root / f"step-{step}", accelerator, model, optimizer, scheduler, state, method, keep=spec.save_total_limit)
                why = (ckpt_root / STOP_FILE).read_text().strip() or "a stop was requested"
                report.log(f"stopping at step {step}: {why}")
                raise TrainingStopped(f"{why}; stopped at checkpoint step-{step}: the next materialization resumes from it")
            if spec.stop_after_steps and step >= spec.stop_after_steps and step < total_steps:
                report.log(f"stopping at step {step} as asked (stop_after_steps)")
                os._exit(3)  # like a kill: no cleanup, no final save
            if step >= total_steps:
                break
        else:
            epoch, start_batch = epoch + 1, 0
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - t_start
    steady = speed.summary()
    # the peak this run's MFU is read against, measured here after the training (same process, same
    # device, same dtype) for 2% of the training's time, at least 0.3 s and at most 1.5 s: a short run
    # no longer spends more time measuring the peak than learning
    peak = (
        matmul_peak_flops(DTYPES[precision], "cuda" if on_gpu else "cpu", seconds=min(1.5, max(0.3, 0.02 * elapsed)))
        if accelerator.is_main_process
        else 0.0
    )
    achieved = steady["steady_tokens_per_s"] * flops["total"] if steady["steady_tokens_per_s"] else None
    if peak:
        mfu = f"{achieved / 1e12:.3f} TFLOP/s in steady steps: MFU {achieved / peak:.2f}" if achieved else "no steady steps to measure"
        report.log(f"matmul peak {peak / 1e12:.3f} TFLOP/s ({precision}, measured after the training); {mfu}")
    result = {
        "steps": step,
        "total_steps": total_steps,
        "epochs": round(step / steps_per_epoch, 3),
        "train_rows": n_rows,
        "opening_copies": len(train_rows) - n_rows,
        "eval_rows": len(eval_rows),
        "first_eval_loss": first_eval,
        "final_eval_loss": last_eval,
        "final_train_loss": values["train_loss"] if step > start_step else None,
        "train_seconds": round(elapsed, 1),
        "trained_tokens": state["tokens"],
        **steady,
        "flops_per_token": round(flops["total"]),
        "achieved_tflops": round(achieved / 1e12, 4) if achieved else None,
        "matmul_peak_tflops": round(peak / 1e12, 4) if peak else None,
        "mfu": round(achieved / peak, 4) if achieved and peak else None,
        "processes": world,
        "device": str(accelerator.device),
        "precision": precision,
        "attention": attn,
        "gradient_checkpointing": checkpointing,
        "method": method,
        "optimizer": optimizer_name(spec),
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "resumed_from": resumed_from,
        "adapter_path": spec.output_dir,
        # this process's peak resident memory (weights, activations, optimizer states) and the GPU's
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None,
    }
    full = gathered_state_dict(accelerator, model)  # every process takes part where the model is sharded
    if accelerator.is_main_process:
        import json

        from pipeline.core.atomic import atomic_dir
        from pipeline.core.secrets import redact_params

        with atomic_dir(Path(spec.output_dir)) as tmp:
            save_trained(accelerator.unwrap_model(model).peft_model, tmp, method, ckpt_root, state_dict=full)
            tokenizer.save_pretrained(tmp)
            result["adapter_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            record = {"spec": redact_params(spec.model_dump()), "result": result}
            (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
            if report.metrics_path.is_file():
                (tmp / "metrics.jsonl").write_bytes(report.metrics_path.read_bytes())
        report.log(f"adapter saved to {spec.output_dir} after {step} steps in {elapsed:.0f}s")
    report.done(result)
    return result
