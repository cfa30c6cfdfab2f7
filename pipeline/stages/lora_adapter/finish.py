"""A training's end: the matmul peak its MFU is read against, its figures, and the adapter saved
whole with its record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.stages.lora_adapter.checkpoint import gathered_state_dict
from pipeline.stages.lora_adapter.setup import Progress, Training
from pipeline.stages.lora_adapter.spec import TRAINING_RECORD


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


def finish(run: Training, first_eval: float | None, progress: Progress) -> dict[str, Any]:
    """Measure the peak the run is read against, gather the figures, save the adapter with its record."""
    elapsed = time.perf_counter() - progress.t_start
    steady = progress.speed.summary()
    peak = measure_peak(run, elapsed)
    achieved = steady["steady_tokens_per_s"] * run.flops["total"] if steady["steady_tokens_per_s"] else None
    if peak:
        mfu = (
            f"{achieved / 1e12:.3f} TFLOP/s in steady steps: MFU {achieved / peak:.2f}"
            if achieved
            else "no steady steps to measure"
        )
        run.report.log(f"matmul peak {peak / 1e12:.3f} TFLOP/s ({run.precision}, measured after the training); {mfu}")
    step = run.state["step"]
    result = {
        **run_figures(run, first_eval, progress),
        "train_seconds": round(elapsed, 1),
        **steady,
        "flops_per_token": round(run.flops["total"]),
        "achieved_tflops": round(achieved / 1e12, 4) if achieved else None,
        "matmul_peak_tflops": round(peak / 1e12, 4) if peak else None,
        "mfu": round(achieved / peak, 4) if achieved and peak else None,
    }
    save_adapter(run, result)
    run.report.log(f"adapter saved to {run.spec.output_dir} after {step} steps in {elapsed:.0f}s")
    run.report.done(result)
    return result


def measure_peak(run: Training, elapsed: float) -> float:
    """The matmul peak in this process, device and dtype, for 2% of the training's time (0.3 to 1.5 s)."""
    from pipeline.stages.lora_adapter.flops import matmul_peak_flops
    from pipeline.stages.lora_adapter.model import DTYPES

    if not run.accelerator.is_main_process:
        return 0.0
    return matmul_peak_flops(
        DTYPES[run.precision], "cuda" if run.on_gpu else "cpu", seconds=min(1.5, max(0.3, 0.02 * elapsed))
    )


def run_figures(run: Training, first_eval: float | None, progress: Progress) -> dict[str, Any]:
    """What the training did and on what: steps, rows, losses, devices, the model, memory."""
    import torch

    from pipeline.stages.lora_adapter.methods import optimizer_name

    step = run.state["step"]
    return {
        "steps": step,
        "total_steps": run.total_steps,
        "epochs": round(step / run.steps_per_epoch, 3),
        "train_rows": run.n_rows,
        "opening_copies": len(run.train_rows) - run.n_rows,
        "eval_rows": len(run.eval_rows),
        "first_eval_loss": first_eval,
        "final_eval_loss": progress.last_eval,
        "final_train_loss": progress.last_values.get("train_loss") if step > progress.start_step else None,
        "trained_tokens": run.state["tokens"],
        "processes": run.world,
        "device": str(run.accelerator.device),
        "precision": run.precision,
        "attention": run.attn,
        "gradient_checkpointing": run.checkpointing,
        "method": run.spec.method,
        "optimizer": optimizer_name(run.spec),
        "trainable_parameters": run.trainable,
        "total_parameters": run.total_params,
        "resumed_from": run.resumed_from,
        "adapter_path": run.spec.output_dir,
        # this process's peak resident memory (weights, activations, optimizer states) and the GPU's
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if run.on_gpu else None,
    }


def save_adapter(run: Training, result: dict[str, Any]) -> None:
    """The adapter, its tokenizer, metrics and training record, written whole into ``output_dir``."""
    import json

    from pipeline.core.atomic import atomic_dir
    from pipeline.core.secrets import redact_params
    from pipeline.stages.lora_adapter.model import save_trained

    full = gathered_state_dict(run.accelerator, run.model)  # every process takes part where the model is sharded
    if not run.accelerator.is_main_process:
        return
    with atomic_dir(Path(run.spec.output_dir)) as tmp:
        save_trained(
            run.accelerator.unwrap_model(run.model).peft_model, tmp, run.spec.method, run.ckpt_root, state_dict=full
        )
        run.tokenizer.save_pretrained(tmp)
        result["adapter_bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        (tmp / TRAINING_RECORD).write_text(
            json.dumps({"spec": redact_params(run.spec.model_dump()), "result": result}, indent=2)
        )
        if run.report.metrics_path.is_file():
            (tmp / "metrics.jsonl").write_bytes(run.report.metrics_path.read_bytes())
