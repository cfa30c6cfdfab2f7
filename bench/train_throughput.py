"""Benchmark: LoRA training against the hardware's limit and against the tutorial recipe, in one run.

    python bench/train_throughput.py [--rows 32] [--model bundled:SmolLM2-135M-Instruct]
    python bench/train_throughput.py --shape qwen2.5-1.5b     # on a GPU: random weights, Qwen2.5-1.5B's shape

Printed, all measured in this run (these machines differ by 2x, and a shared one by the minute):

* the model's training FLOPs per token, from its config (``pipeline.stages.lora_adapter.flops``: linear layers
  forward and input gradients, causal attention, the vocabulary projection at supervised positions,
  the adapters);
* the bf16 and fp32 peaks of a 2048 (CPU) or 8192 (GPU) square matrix multiply;
* ``pipeline``: ``pipeline.stages.lora_adapter`` with the ``lora_adapter`` defaults, one epoch over the rows,
  in a child process: tokens/s and rows/s of the steady steps (from the end of the first step, which
  carries compilation), achieved FLOP/s and MFU = achieved ÷ the bf16 peak (fp32 where the device
  has no bf16) measured in that child just before it trains;
* ``recipe``: the tutorial this project grew from, re-created on the same rows in its own child:
  context ("instruction\\ninput") and target tokenized separately, each padded to 512, the target
  ids used as labels (misaligned: the recipe really trains on none of the answers), fp32, a custom
  shifted cross-entropy over all positions, LoRA r 8 alpha 32 dropout 0.1 on q_proj and v_proj,
  ``transformers.Trainer``, batch 4. Compared by rows per second: both see every row once.

The last line is JSON with ``mfu``, ``pipeline_rows_per_s``, ``recipe_rows_per_s``, ``rows_ratio``
and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5-1.5B's shape (config.json of Qwen/Qwen2.5-1.5B-Instruct), for a GPU with no hub access
SHAPES = {
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    )
}


def load_rows(n: int, data: Path) -> list[dict]:
    """The first n records of an Alpaca JSON file (read as it is: the bench needs no validation,
    and the GPU machine has no Great Expectations)."""
    records = json.loads(Path(data).read_text(encoding="utf-8"))
    return [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in records[:n]]


def resolve_model(model: str, shape: str | None, tokenizer: str | None, work: Path) -> str:
    if shape:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder = work / shape
        config = AutoConfig.for_model(**SHAPES[shape])
        AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
        # any tokenizer with a chat template will do (its ids fit the larger vocabulary)
        if tokenizer:
            AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
        else:
            from pipeline.stages.base_model.bundled import load_bundled_tokenizer

            load_bundled_tokenizer().save_pretrained(folder)
        return str(folder)
    from pipeline.stages.base_model import resolve_base_model
    from resources.data_root import DataRoot, default_data_dir

    return resolve_base_model(model, DataRoot(path=default_data_dir()).models_dir).path


def preset_settings(name: str) -> dict:
    import yaml

    from pipeline.stages.lora_adapter import TrainSpec

    ops = yaml.safe_load((ROOT / "pipeline" / "presets" / f"{name}.yaml").read_text())["ops"]
    train = {k: v for k, v in ops.get("lora_adapter", {}).get("config", {}).items() if k in TrainSpec.model_fields}
    seq = ops.get("tokenized_dataset", {}).get("config", {}).get("max_seq_len")
    return {**train, **({"max_seq_len": seq} if seq else {})}


def peaks(device: str) -> dict[str, float]:
    import torch

    from pipeline.stages.lora_adapter.flops import matmul_peak_flops

    n = 2048 if device == "cpu" else 8192
    return {"bf16": matmul_peak_flops(torch.bfloat16, device, n), "fp32": matmul_peak_flops(torch.float32, device, n)}


def run_pipeline(model_path: str, rows: list[dict], work: Path, overrides: dict) -> dict:
    import pandas as pd
    from transformers import AutoTokenizer

    from pipeline.stages.lora_adapter import TrainSpec, train
    from pipeline.stages.tokenized_dataset import DEFAULT_MAX_SEQ_LEN, tokenize_dataset

    tok = AutoTokenizer.from_pretrained(model_path)
    df = pd.DataFrame(rows).assign(split="train", record_id=[f"r{i}" for i in range(len(rows))])
    ds = tokenize_dataset(
        df,
        tok,
        data_fingerprint="bench",
        tokenizer_fingerprint="bench",
        out_root=work / "tok",
        max_seq_len=overrides.pop("max_seq_len", DEFAULT_MAX_SEQ_LEN),
    )
    # TrainSpec's defaults are the lora_adapter asset's defaults (one source); a preset or --set on top
    # one pass over each row, as the recipe makes (no opening copies), unless a preset or --set asks for them
    settings = dict(max_steps=None, eval_every=10**6, save_every=10**6, log_every=10**6, opening_repeats=0)
    settings.update(overrides)
    spec = TrainSpec(
        base_model_path=model_path,
        tokenized_path=ds.path,
        output_dir=str(work / "adapter"),
        checkpoint_dir=str(work / "ckpt"),
        **settings,
    )
    r = train(spec)
    if r["steady_tokens_per_s"] is None:
        raise SystemExit(
            f"{r['steps']} step(s): too few for the steady figures, which start after the first step "
            "(it carries compilation and warm-up); give more --rows or --epochs"
        )
    return {
        "rows": len(rows),
        "steps": r["steps"],
        "seconds": r["train_seconds"],
        "tokens": r["trained_tokens"],
        "tokens_per_s": r["steady_tokens_per_s"],
        "rows_per_s": r["steady_rows_per_s"],
        "steady_steps": r["steady_steps"],
        "flops_per_token": r["flops_per_token"],
        "achieved_tflops": r["achieved_tflops"],
        "peak_tflops": r["matmul_peak_tflops"],
        "mfu": r["mfu"],
        "precision": r["precision"],
        "attention": r["attention"],
        "settings": {
            k: settings.get(k, getattr(spec, k))
            for k in ("packing", "pack_tokens", "compile", "r", "lora_dropout", "opening_repeats")
        },
    }


def run_recipe(model_path: str, rows: list[dict], work: Path, overrides: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    contexts = [f"{r['instruction']}\n{r['input']}" for r in rows]
    targets = [r["output"] for r in rows]
    enc_c = tok(contexts, max_length=512, padding="max_length", truncation=True)
    enc_t = tok(targets, max_length=512, padding="max_length", truncation=True)
    ds = Dataset.from_dict(
        {"input_ids": enc_c["input_ids"], "attention_mask": enc_c["attention_mask"], "labels": enc_t["input_ids"]}
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )

    class RecipeTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = torch.nn.functional.cross_entropy(
                shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1)
            )
            return (loss, logits) if return_outputs else loss

    args = TrainingArguments(
        output_dir=str(work / "recipe"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=5e-5,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=42,
    )
    trainer = RecipeTrainer(model=model, args=args, train_dataset=ds)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    return {
        "rows": len(rows),
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "tokens": 512 * len(rows),
        "tokens_per_s": 512 * len(rows) / seconds,
        "rows_per_s": len(rows) / seconds,
        "precision": "fp32",
    }


def child(which: str, model_path: str, rows_file: str, overrides: str) -> None:
    rows = json.loads(Path(rows_file).read_text())
    with tempfile.TemporaryDirectory(prefix=f"medtune-{which}-") as tmp:
        result = (run_pipeline if which == "pipeline" else run_recipe)(
            model_path, rows, Path(tmp), json.loads(overrides)
        )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH_TRAIN " + json.dumps(result), flush=True)


def measure(which: str, model_path: str, rows_file: Path, overrides: dict) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            which,
            "--model-path",
            model_path,
            "--rows-file",
            str(rows_file),
            "--set",
            json.dumps(overrides),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_TRAIN "):
            return json.loads(line[len("BENCH_TRAIN ") :])
    raise RuntimeError(f"{which} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32, help="training rows, each trained once by both")
    ap.add_argument(
        "--data",
        default=str(ROOT / "data" / "raw" / "cpm_demo.json"),
        help="an Alpaca JSON file (default: the demo data)",
    )
    ap.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    ap.add_argument(
        "--shape", choices=sorted(SHAPES), help="a randomly initialised model of this shape instead of --model"
    )
    ap.add_argument("--tokenizer", help="with --shape: a folder with a tokenizer (default: the bundled SmolLM2 one)")
    ap.add_argument(
        "--preset", help="a preset under pipeline/presets/ (its lora_adapter and tokenized_dataset settings)"
    )
    ap.add_argument(
        "--set", default="{}", help="JSON of training settings over the defaults, e.g. '{\"pack_tokens\": 32768}'"
    )
    ap.add_argument(
        "--epochs", type=float, default=1.0, help="passes of the pipeline's training over the rows (the recipe: one)"
    )
    ap.add_argument("--skip-recipe", action="store_true")
    ap.add_argument("--child", choices=["pipeline", "recipe"])
    ap.add_argument("--model-path")
    ap.add_argument("--rows-file")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model_path, args.rows_file, args.set)
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = preset_settings(args.preset) if args.preset else {}
    overrides.update(epochs=args.epochs, **json.loads(args.set))
    with tempfile.TemporaryDirectory() as tmp:
        model_path = resolve_model(args.model, args.shape, args.tokenizer, Path(tmp))
        rows = load_rows(args.rows, Path(args.data))
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows, ensure_ascii=False))
        device_name = torch.cuda.get_device_name() if device == "cuda" else (os.cpu_count(), "CPU cores")
        before = peaks(device)
        print(
            f"device {device_name}; matmul peak bf16 {before['bf16'] / 1e12:.3f} TFLOP/s, fp32 "
            f"{before['fp32'] / 1e12:.3f} TFLOP/s",
            flush=True,
        )
        p = measure("pipeline", model_path, rows_file, overrides)
        print(
            f"pipeline: {p['rows']} rows, {p['tokens']} tokens, {p['steps']} steps in {p['seconds']:.1f} s; steady "
            f"{p['tokens_per_s']:.1f} tokens/s, {p['rows_per_s']:.3f} rows/s; {p['flops_per_token'] / 1e9:.3f} "
            "GFLOP/token "
            f"-> {p['achieved_tflops']:.3f} TFLOP/s of a {p['peak_tflops']:.3f} peak: MFU {p['mfu']:.3f} "
            f"({p['precision']}, {p['attention']}, {p['settings']}); peak RSS {p['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        q = None
        if not args.skip_recipe:
            q = measure("recipe", model_path, rows_file, {})
            print(
                f"recipe  : {q['rows']} rows, {q['tokens']} padded tokens, {q['steps']} steps in {q['seconds']:.1f} s; "
                f"{q['rows_per_s']:.3f} rows/s; peak RSS {q['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        after = peaks(device)
    print(
        json.dumps(
            {
                "model": args.shape or args.model,
                "device": str(device_name),
                "rows": len(rows),
                "peak_bf16_tflops": round(max(before["bf16"], after["bf16"]) / 1e12, 4),
                "peak_fp32_tflops": round(max(before["fp32"], after["fp32"]) / 1e12, 4),
                "flops_per_token": p["flops_per_token"],
                "pipeline_tokens_per_s": p["tokens_per_s"],
                "pipeline_rows_per_s": p["rows_per_s"],
                "pipeline_achieved_tflops": p["achieved_tflops"],
                "mfu": p["mfu"],
                "recipe_rows_per_s": round(q["rows_per_s"], 4) if q else None,
                "rows_ratio": round(p["rows_per_s"] / q["rows_per_s"], 2) if q else None,
                "pipeline_peak_rss_mb": round(p["peak_rss_mb"]),
                "recipe_peak_rss_mb": round(q["peak_rss_mb"]) if q else None,
            }
        )
    )


if __name__ == "__main__":
    main()
