"""Benchmark: batched greedy generation (``pipeline.stages.evaluation_report.generate_greedy``, left padding)
against one prompt at a time, on the same prompts and the same model, side by side in one run.

    python bench/generation_throughput.py [--prompts 16] [--batch-size 8] [--max-new-tokens 128]

The prompts are the demo data's eval and train rows in the training chat template and system
prompt, as ``evaluation_report`` sends them. The figure compared is new tokens per second (tokens
up to and excluding the end-of-turn token; model loading excluded). It also says whether both
ways produced the same tokens. Prints a last line of JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_prompts(tokenizer, n: int) -> list[str]:
    from pipeline.stages.deduplicated_records import deduplicate
    from pipeline.stages.raw_records import ingest
    from pipeline.stages.alpaca_dataset import build_alpaca
    from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, render_prompt
    from pipeline.stages.validated_records import validate_records

    alpaca = build_alpaca(deduplicate(validate_records(ingest(ROOT / "data" / "raw").kept).kept).kept)
    alpaca = alpaca.sort_values("split").head(n)  # eval rows first, then train rows
    return [render_prompt(tokenizer, i, x, DEFAULT_SYSTEM_PROMPT) for i, x in zip(alpaca["instruction"], alpaca["input"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.evaluation_report import generate_greedy, stop_token_ids
    from pipeline.stages.base_model import resolve_base_model
    from resources.data_root import DataRoot, default_data_dir

    path = resolve_base_model(args.model, DataRoot(path=default_data_dir()).models_dir).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    model.eval()
    prompts = demo_prompts(tokenizer, args.prompts)
    stops = stop_token_ids(tokenizer)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads", flush=True)
    generate_greedy(model, tokenizer, prompts[:2], max_new_tokens=4, stop_ids=stops, batch_size=2)  # warm-up

    results = {}
    outputs = {}
    for name, bs in (("one_at_a_time", 1), ("batched", args.batch_size)):
        t0 = time.perf_counter()
        out = generate_greedy(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, stop_ids=stops, batch_size=bs)
        seconds = time.perf_counter() - t0
        new = sum(len(x) for x in out)
        outputs[name] = out
        results[name] = {"batch_size": bs, "seconds": round(seconds, 2), "new_tokens": new,
                         "new_tokens_per_s": round(new / seconds, 2)}
        print(f"{name:>14}: batch {bs}, {new} new tokens in {seconds:.1f} s = {new / seconds:.1f} tokens/s", flush=True)
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["one_at_a_time"]))
    ratio = results["batched"]["new_tokens_per_s"] / results["one_at_a_time"]["new_tokens_per_s"]
    print(json.dumps({
        "benchmark": "generation_throughput",
        "model": args.model,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batched_new_tokens_per_s": results["batched"]["new_tokens_per_s"],
        "one_at_a_time_new_tokens_per_s": results["one_at_a_time"]["new_tokens_per_s"],
        "ratio": round(ratio, 2),
        "goal_ratio": 4.0,
        "identical_answers": f"{same}/{len(prompts)}",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "details": results,
    }))


if __name__ == "__main__":
    main()
