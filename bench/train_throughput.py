"""Benchmark: this pipeline's LoRA training against the tutorial recipe it grew from, side by side.

    python bench/train_throughput.py [--rows 16] [--model bundled:SmolLM2-135M-Instruct]

Both train the same base model on the same demo rows for one epoch, each in its own child process,
one after the other in this run:

* ``pipeline``: ``pipeline.train.train`` with the ``lora_adapter`` defaults (chat template, prompt
  tokens masked, batches grouped by length and padded per batch to a multiple of 8, bf16 autocast
  where the CPU supports it, eager attention, LoRA r 16 on all linear layers);
* ``recipe``: a faithful re-creation of the tutorial: context ("instruction\\ninput") and target
  tokenized separately, each padded to 512, the target ids used as labels, fp32, a custom shifted
  cross-entropy over all positions, LoRA r 8 alpha 32 dropout 0.1 on q_proj and v_proj,
  learning rate 5e-5, ``transformers.Trainer`` with its default collator.

The figure compared is supervised answer tokens per second of training: the answer tokens (plus
the end-of-turn token, for the pipeline) that the row contributes, divided by the training loop's
wall time (model loading excluded). Prints a last line of JSON with both, their ratio and each
child's peak RSS.
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


def demo_rows(n: int) -> list[dict]:
    from pipeline.dedup import deduplicate
    from pipeline.ingest import ingest
    from pipeline.split import build_alpaca
    from pipeline.validate import validate_records

    alpaca = build_alpaca(deduplicate(validate_records(ingest(ROOT / "data" / "raw").kept).kept).kept)
    rows = alpaca[alpaca["split"] == "train"].head(n)
    return rows[["record_id", "instruction", "input", "output"]].to_dict("records")


def resolve_model(model: str) -> str:
    from pipeline.model_source import resolve_base_model
    from resources.data_root import DataRoot, default_data_dir

    return resolve_base_model(model, DataRoot(path=default_data_dir()).models_dir).path


def run_pipeline(model_path: str, rows: list[dict], work: Path) -> dict:
    import pandas as pd
    from transformers import AutoTokenizer

    from pipeline.tokenization import tokenize_dataset
    from pipeline.train import TrainSpec, train

    tok = AutoTokenizer.from_pretrained(model_path)
    df = pd.DataFrame(rows).assign(split="train")
    ds = tokenize_dataset(df, tok, data_fingerprint="bench", tokenizer_fingerprint="bench", out_root=work / "tok")
    supervised = int(ds.load("train")["n_supervised"].sum())
    spec = TrainSpec(base_model_path=model_path, tokenized_path=ds.path, output_dir=str(work / "adapter"),
                     checkpoint_dir=str(work / "ckpt"), epochs=1, eval_every=10**6, save_every=10**6, log_every=10**6)
    result = train(spec)
    return {"seconds": result["train_seconds"], "supervised_tokens": supervised, "steps": result["steps"],
            "precision": result["precision"], "attention": result["attention"]}


def run_recipe(model_path: str, rows: list[dict], work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_path)
    contexts = [f"{r['instruction']}\n{r['input']}" for r in rows]
    targets = [r["output"] for r in rows]
    enc_c = tok(contexts, max_length=512, padding="max_length", truncation=True)
    enc_t = tok(targets, max_length=512, padding="max_length", truncation=True)
    supervised = int(sum(sum(m) for m in enc_t["attention_mask"]))
    ds = Dataset.from_dict({"input_ids": enc_c["input_ids"], "attention_mask": enc_c["attention_mask"],
                            "labels": enc_t["input_ids"]})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))

    class RecipeTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = torch.nn.functional.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            return (loss, logits) if return_outputs else loss

    args = TrainingArguments(output_dir=str(work / "recipe"), per_device_train_batch_size=4, num_train_epochs=1,
                             learning_rate=5e-5, logging_steps=10**6, save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=42)
    trainer = RecipeTrainer(model=model, args=args, train_dataset=ds)
    t = time.perf_counter()
    trainer.train()
    return {"seconds": time.perf_counter() - t, "supervised_tokens": supervised, "steps": trainer.state.global_step,
            "precision": "fp32", "attention": model.config._attn_implementation if hasattr(model, "config") else "?"}


def child(which: str, model_path: str, rows_file: str) -> None:
    rows = json.loads(Path(rows_file).read_text())
    with tempfile.TemporaryDirectory(prefix=f"medtune-{which}-") as tmp:
        result = (run_pipeline if which == "pipeline" else run_recipe)(model_path, rows, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps(result), flush=True)


def measure(which: str, model_path: str, rows_file: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--model-path", model_path, "--rows-file", str(rows_file)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH "):])
    raise RuntimeError(f"{which} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    ap.add_argument("--child", choices=["pipeline", "recipe"])
    ap.add_argument("--model-path")
    ap.add_argument("--rows-file")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model_path, args.rows_file)
        return
    model_path = resolve_model(args.model)
    rows = demo_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.json"
        rows_file.write_text(json.dumps(rows, ensure_ascii=False))
        results = {}
        for which in ("pipeline", "recipe"):
            r = measure(which, model_path, rows_file)
            r["supervised_tokens_per_s"] = r["supervised_tokens"] / r["seconds"]
            results[which] = r
            print(f"{which:8s}: {r['supervised_tokens']} supervised tokens in {r['seconds']:.1f} s "
                  f"({r['supervised_tokens_per_s']:.1f}/s), {r['steps']} steps, {r['precision']}, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    p, q = results["pipeline"], results["recipe"]
    print(json.dumps({
        "model": args.model, "rows": len(rows),
        "pipeline_supervised_tokens_per_s": round(p["supervised_tokens_per_s"], 1),
        "recipe_supervised_tokens_per_s": round(q["supervised_tokens_per_s"], 1),
        "ratio": round(p["supervised_tokens_per_s"] / q["supervised_tokens_per_s"], 2),
        "pipeline_peak_rss_mb": round(p["peak_rss_mb"]), "recipe_peak_rss_mb": round(q["peak_rss_mb"]),
    }))


if __name__ == "__main__":
    main()
