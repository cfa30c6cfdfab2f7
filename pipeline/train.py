"""Stage (asset ``lora_adapter``): LoRA fine-tuning, as a child process the asset starts.

    python -m pipeline.train --spec spec.json                          # one process
    torchrun --nproc_per_node 2 -m pipeline.train --spec spec.json      # DDP (gloo on CPU, NCCL on GPU)
    accelerate launch --config_file fsdp.yaml -m pipeline.train --spec spec.json

The spec (written by the asset) names the tokenized dataset, the base model, the output and
checkpoint folders and the training settings. The loop is plain PyTorch with 🤗 Accelerate doing
device placement, mixed precision, DDP/FSDP/DeepSpeed and gradient accumulation, so one can read
it in one sitting:

1. load the base model (safetensors only) and wrap it with a peft LoRA config;
2. batch the tokenized rows grouped by length, padded per batch to a multiple of 8 (labels -100 on
   padding; prompt tokens are already -100), in an order fixed by the seed and the epoch;
3. AdamW over the LoRA weights, cosine schedule with warmup, the model's own loss;
4. every ``log_every`` steps report step, loss, learning rate, grad norm, tokens/s and ETA; every
   ``eval_every`` steps the eval loss; every ``save_every`` steps a checkpoint (adapter weights,
   optimizer, scheduler, RNG state, position in the data) written atomically;
5. on start, resume from the latest complete checkpoint of the same training, if any;
6. save the adapter (and the tokenizer with its chat template) atomically.

Progress goes to Dagster Pipes when run under Dagster, else to stdout, and to MLflow (rank 0)
when a run id is given; metrics are also kept in ``metrics.jsonl`` beside the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


@dataclass
class TrainSpec:
    base_model_path: str
    tokenized_path: str
    output_dir: str  # the finished adapter goes here (atomically)
    checkpoint_dir: str  # step-N/ folders
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 2.0
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    seed: int = 42
    max_seq_len: int = 2048
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    gradient_checkpointing: bool | None = None  # None: on for GPU, off for CPU
    # sdpa: measured on this 2-core CPU (bf16 autocast, all-linear LoRA, rows ~500 tokens, batch 4)
    # at 102-118 tokens/s and 7.7 GB peak against eager's 89-102 tokens/s and 11.6 GB
    attn_implementation: str = "sdpa"
    log_every: int = 1
    eval_every: int = 10
    save_every: int = 10
    trust_remote_code: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    stop_after_steps: int | None = None  # tests: stop (as if killed) after this many steps
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainSpec":
        return cls(**json.loads(Path(path).read_text()))

    def dump(self, path: str | os.PathLike) -> None:
        from pipeline.atomic import write_bytes_atomic

        write_bytes_atomic(path, json.dumps(asdict(self), indent=2).encode())


# ------------------------------------------------------------------------------ data


def load_rows(tokenized_path: str, split: str, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(Path(tokenized_path) / f"{split}.parquet", columns=["input_ids", "labels"])
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    return [(i[:max_seq_len], l[:max_seq_len]) for i, l in zip(ids, labels)]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, mega: int = 50) -> list[list[int]]:
    """Shuffle, then sort within mega-batches by length, so each batch holds rows of similar
    length (little padding) while the order still changes every epoch (HF's LengthGroupedSampler)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * mega
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, multiple: int = 8) -> dict[str, Any]:
    """Pad to the longest row, rounded up to a multiple of 8; padding is never supervised."""
    import torch

    longest = max(len(r[0]) for r in rows)
    width = -(-longest // multiple) * multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (ids, lab) in enumerate(rows):
        input_ids[k, : len(ids)] = torch.tensor(ids)
        labels[k, : len(lab)] = torch.tensor(lab)
        attention[k, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


# ------------------------------------------------------------------------- reporting


class Reporter:
    """Progress to Dagster Pipes (if this process runs under it) or stdout; metrics to MLflow."""

    def __init__(self, spec: TrainSpec, is_main: bool):
        self.is_main = is_main
        self.pipes = None
        self.mlflow = None
        self.metrics_path = Path(spec.checkpoint_dir) / "metrics.jsonl"
        self.mlflow_error: str | None = None
        if not is_main:
            return
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            with open(self.metrics_path, "rb+") as fh:  # a kill mid-line left it unterminated: end it
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._pipes_cm = open_dagster_pipes()
            self.pipes = self._pipes_cm.__enter__()
        if spec.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.mlflow = MlflowClient(spec.mlflow_tracking_uri)
            self.run_id = spec.mlflow_run_id

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.pipes is not None:
            self.pipes.log.info(msg)
        else:
            print(msg, flush=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        Path(self.metrics_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.mlflow is not None:
            try:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
            except Exception as exc:  # keep training; the metrics are in metrics.jsonl
                self.mlflow_error = str(exc)
                self.mlflow = None  # no retries at every step: the asset sends what is missing afterwards
                self.log(f"WARNING: MLflow logging failed at step {step} ({str(exc)[:300]}); training goes on, "
                         f"metrics are kept in {self.metrics_path} and sent to MLflow when it is reachable again")

    def done(self, metadata: dict[str, Any]) -> None:
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata)
            self._pipes_cm.__exit__(None, None, None)
        elif self.is_main:
            print("RESULT " + json.dumps(metadata), flush=True)


# ------------------------------------------------------------------------ checkpoints


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    done = [p for p in checkpoint_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from pipeline.atomic import atomic_dir

    with atomic_dir(path) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, tmp / "adapter_model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # written last: marks it complete


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return json.loads((path / "trainer_state.json").read_text())


# ---------------------------------------------------------------------------- setup


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, on_gpu: bool) -> str:
    import torch

    if precision != "auto":
        return precision
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def evaluate(model, accelerator, rows, batch_size: int, pad_id: int) -> float | None:
    """Mean loss over every supervised eval token (all processes together)."""
    import torch

    if not rows:
        return None
    # the bare model, not the DDP wrapper: processes run different numbers of eval batches,
    # and DDP's forward would wait for the others
    model = accelerator.unwrap_model(model)
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    with torch.no_grad():
        for start in range(accelerator.process_index * batch_size, len(rows), batch_size * accelerator.num_processes):
            batch = {k: v.to(accelerator.device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
            n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            with accelerator.autocast():
                loss = model(**batch).loss
            total += torch.stack([loss.float() * n, n.float()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item() if total[1] > 0 else None


def train(spec: TrainSpec) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    attn = spec.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        spec.base_model_path,
        dtype=torch.float32,  # trainable LoRA weights stay fp32; autocast handles bf16/fp16
        use_safetensors=True,
        trust_remote_code=spec.trust_remote_code,
        attn_implementation=attn,
    )
    checkpointing = on_gpu if spec.gradient_checkpointing is None else spec.gradient_checkpointing
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=spec.target_modules if spec.target_modules == "all-linear" else [m.strip() for m in spec.target_modules.split(",")],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable, total_params = model.get_nb_trainable_parameters()

    train_rows = load_rows(spec.tokenized_path, "train", spec.max_seq_len)
    eval_rows = load_rows(spec.tokenized_path, "eval", spec.max_seq_len)
    if not train_rows:
        raise ValueError(f"no training rows in {spec.tokenized_path}")
    lengths = [len(r[0]) for r in train_rows]
    world = accelerator.num_processes
    global_batch = spec.per_device_batch_size * world
    batches_per_epoch = math.ceil(len(train_rows) / global_batch)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / spec.gradient_accumulation_steps))
    total_steps = spec.max_steps or max(1, math.ceil(steps_per_epoch * spec.epochs))

    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable_params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(total_steps * spec.warmup_ratio), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    ckpt_root = Path(spec.checkpoint_dir)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0}
    resumed_from = None
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        resumed_from = ckpt.name
        report.log(f"resuming from checkpoint {ckpt} (step {state['step']} of {total_steps})")
    report.log(
        f"training {trainable:,} LoRA parameters of {total_params:,} on {len(train_rows)} rows "
        f"({len(eval_rows)} eval), {world} process(es) on {accelerator.device}, {precision}, attention {attn}; "
        f"{total_steps} steps, batch {spec.per_device_batch_size}x{world}x{spec.gradient_accumulation_steps}"
    )

    model.train()
    step, t_start, tokens_since = state["step"], time.perf_counter(), 0
    t_log = t_start
    first_eval = last_eval = None
    if step == 0 and eval_rows:
        first_eval = evaluate(model, accelerator, eval_rows, spec.per_device_batch_size, pad_id)
        report.metrics({"eval_loss": first_eval}, step=0)
        report.log(f"step 0/{total_steps} eval_loss {first_eval:.4f}")
    epoch = state["epoch"]
    done = step >= total_steps
    while not done:
        batches = length_grouped_batches(lengths, global_batch, spec.seed, epoch)
        for b in range(state["batch_in_epoch"] if epoch == state["epoch"] else 0, len(batches)):
            # every process takes its own slice of the global batch
            idx = batches[b][accelerator.process_index :: world] or batches[b][:1]
            batch = {k: v.to(accelerator.device) for k, v in collate([train_rows[i] for i in idx], pad_id).items()}
            tokens_since += int(batch["attention_mask"].sum()) * world
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = model(**batch).loss
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable_params, spec.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            state.update(step=step, epoch=epoch, batch_in_epoch=b + 1, tokens=state["tokens"] + tokens_since)
            if step % spec.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_log, 1e-9)
                eta = (now - t_start) / max(step - (0 if resumed_from is None else int(resumed_from.split("-")[1])), 1) * (total_steps - step)
                loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                values = {"train_loss": loss_value, "learning_rate": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm) if grad_norm is not None else 0.0, "tokens_per_s": tps}
                report.metrics(values, step=step)
                report.log(f"step {step}/{total_steps} loss {loss_value:.4f} lr {values['learning_rate']:.2e} "
                           f"grad_norm {values['grad_norm']:.3f} {tps:,.0f} tokens/s ETA {eta:,.0f}s")
                t_log, tokens_since = now, 0
            if eval_rows and (step % spec.eval_every == 0 or step == total_steps):
                last_eval = evaluate(model, accelerator, eval_rows, spec.per_device_batch_size, pad_id)
                report.metrics({"eval_loss": last_eval}, step=step)
                report.log(f"step {step}/{total_steps} eval_loss {last_eval:.4f}")
            if step % spec.save_every == 0 and step < total_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(ckpt_root / f"step-{step}", accelerator.unwrap_model(model), optimizer, scheduler, state)
                    report.log(f"checkpoint saved at step {step}")
            if spec.stop_after_steps and step >= spec.stop_after_steps and step < total_steps:
                report.log(f"stopping at step {step} as asked (stop_after_steps)")
                os._exit(3)  # like a kill: no cleanup, no final save
            if step >= total_steps:
                done = True
                break
        else:
            epoch += 1
            state["batch_in_epoch"] = 0
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - t_start
    result = {
        "steps": step,
        "total_steps": total_steps,
        "epochs": round(step / steps_per_epoch, 3),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "first_eval_loss": first_eval,
        "final_eval_loss": last_eval,
        "final_train_loss": loss_value if step else None,
        "train_seconds": round(elapsed, 1),
        "processes": world,
        "device": str(accelerator.device),
        "precision": precision,
        "attention": attn,
        "trainable_parameters": trainable,
        "resumed_from": resumed_from,
        "adapter_path": spec.output_dir,
    }
    if accelerator.is_main_process:
        from pipeline.atomic import atomic_dir

        with atomic_dir(Path(spec.output_dir)) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            from pipeline.secrets import redact_params

            record = {"spec": redact_params(asdict(spec)), "result": result}
            (tmp / "medtune_training.json").write_text(json.dumps(record, indent=2))
            if report.metrics_path.is_file():
                (tmp / "metrics.jsonl").write_bytes(report.metrics_path.read_bytes())
        report.log(f"adapter saved to {spec.output_dir} after {step} steps in {elapsed:.0f}s")
    report.done(result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MedTune LoRA training (the lora_adapter asset's child process)")
    ap.add_argument("--spec", required=True, help="JSON file with the TrainSpec")
    args = ap.parse_args(argv)
    spec = TrainSpec.load(args.spec)
    error_file = Path(spec.checkpoint_dir) / ERROR_FILE
    error_file.unlink(missing_ok=True)
    try:
        train(spec)
    except Exception as exc:
        # the asset reads this and fails with the reason, not just "exited with code 1"
        if os.environ.get("RANK", "0") == "0":
            try:
                error_file.write_text(f"{type(exc).__name__}: {exc}")
            except OSError:
                pass
        raise
    return 0


ERROR_FILE = "error.txt"


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------ helpers for the asset

# Settings that change what is trained (locations, logging and test hooks do not).
TRAINING_KEYS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "warmup_ratio", "weight_decay",
    "max_grad_norm", "epochs", "per_device_batch_size", "gradient_accumulation_steps", "max_steps", "seed",
    "max_seq_len", "precision", "gradient_checkpointing", "attn_implementation",
)


def adapter_id(data_fingerprint: str, base_fingerprint: str, settings: dict[str, Any], processes: int) -> str:
    """The cache key of a training: same data, base weights and settings → same adapter."""
    from pipeline.fingerprint import sha256_json

    chosen = {k: settings[k] for k in TRAINING_KEYS if k in settings}
    return sha256_json({"data": data_fingerprint, "base": base_fingerprint, "settings": chosen, "processes": processes})[:16]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a kill mid-write: the resumed run logs that step again
            continue
    return out


def plot_loss_curve(metrics: list[dict]) -> bytes:
    """PNG of train and eval loss against the optimizer step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
