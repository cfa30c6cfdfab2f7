"""Benchmark: batched greedy generation (``pipeline.stages.evaluation_report.generate_greedy``: each
prompt prefilled alone, then decoded together over the stacked KV caches) against one prompt at a
time, on the same prompts and the same model, side by side in one run, in the evaluation's own
dtype (``evaluation_report``'s ``dtype: auto``: bf16 where supported) unless ``--dtype`` says.

    python bench/generation_throughput.py [--prompts 32] [--batch-size 32] [--max-new-tokens 64] [--dtype auto]

The prompts are the demo data's eval and train rows in the training chat template and system
prompt, as ``evaluation_report`` sends them. Figures: new tokens per second (tokens up to and
excluding the end-of-turn token; model loading excluded), whether both ways produced the same
tokens, and ``batched_mfu``: the batched run's FLOPs (prefill of every prompt token plus every
decode step, from the model's config: linear layers, attention over the context so far, and the
vocabulary projection where a token is predicted) per second, divided by the matrix-multiply peak
measured in the same run in the same dtype. Prints a last line of JSON.
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
    from pipeline.stages.alpaca_dataset import build_alpaca
    from pipeline.stages.deduplicated_records import deduplicate
    from pipeline.stages.raw_records import ingest
    from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, render_prompt
    from pipeline.stages.validated_records import validate_records

    alpaca = build_alpaca(deduplicate(validate_records(ingest(ROOT / "data" / "raw").kept).kept).kept)
    alpaca = alpaca.sort_values("split").head(n)  # eval rows first, then train rows
    return [
        render_prompt(tokenizer, i, x, DEFAULT_SYSTEM_PROMPT) for i, x in zip(alpaca["instruction"], alpaca["input"])
    ]


def generation_flops(config, prompt_lengths: list[int], new_tokens: list[int]) -> float:
    """FLOPs of greedy generation: every prompt token through the linear layers and causal attention,
    the vocabulary projection at each prompt's last position, then each new token but the last
    (which is only predicted) through the linear layers, attention over its context and the
    vocabulary projection."""
    from pipeline.stages.lora_adapter.flops import config_shape, linear_weights_per_layer

    s = config_shape(config)
    linear = 2 * s["layers"] * linear_weights_per_layer(s)
    attention_per_key = 4 * s["layers"] * s["heads"] * s["head_dim"]  # QK^T and PV
    head = 2 * s["hidden"] * s["vocab"]
    total = 0.0
    for p, n in zip(prompt_lengths, new_tokens):
        total += p * linear + attention_per_key * p * (p + 1) / 2 + head
        for k in range(max(n - 1, 0)):  # decode steps: the k-th new token attends to p + k + 1 keys
            total += linear + attention_per_key * (p + k + 1) + head
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.base_model import resolve_base_model
    from pipeline.stages.lora_adapter.flops import matmul_peak_flops
    from pipeline.stages.lora_adapter.generation import eval_dtype, generate_greedy, stop_token_ids
    from resources.data_root import DataRoot, default_data_dir

    path = resolve_base_model(args.model, DataRoot(path=default_data_dir()).models_dir).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = eval_dtype(args.dtype)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
    model.eval()
    prompts = demo_prompts(tokenizer, args.prompts)
    stops = stop_token_ids(tokenizer)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(
        f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} tokens, max_new_tokens {args.max_new_tokens}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    generate_greedy(model, tokenizer, prompts[:2], max_new_tokens=4, stop_ids=stops, batch_size=2)  # warm-up

    results = {}
    outputs = {}
    for name, bs in (("one_at_a_time", 1), ("batched", args.batch_size)):
        t0 = time.perf_counter()
        out = generate_greedy(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, stop_ids=stops, batch_size=bs
        )
        seconds = time.perf_counter() - t0
        new = sum(len(x) for x in out)
        outputs[name] = out
        results[name] = {
            "batch_size": bs,
            "seconds": round(seconds, 2),
            "new_tokens": new,
            "new_tokens_per_s": round(new / seconds, 2),
        }
        print(f"{name:>14}: batch {bs}, {new} new tokens in {seconds:.1f} s = {new / seconds:.1f} tokens/s", flush=True)
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["one_at_a_time"]))
    ratio = results["batched"]["new_tokens_per_s"] / results["one_at_a_time"]["new_tokens_per_s"]
    flops = generation_flops(model.config, lengths, [len(x) for x in outputs["batched"]])
    peak = matmul_peak_flops(torch_dtype)
    achieved = flops / results["batched"]["seconds"]
    print(
        f"batched: {flops / 1e12:.3f} TFLOP in {results['batched']['seconds']:.1f} s = {achieved / 1e12:.3f} TFLOP/s; "
        f"{dtype} matmul peak measured now {peak / 1e12:.3f} TFLOP/s: MFU {achieved / peak:.3f}",
        flush=True,
    )
    print(
        json.dumps(
            {
                "benchmark": "generation_throughput",
                "model": args.model,
                "prompts": len(prompts),
                "max_new_tokens": args.max_new_tokens,
                "batched_new_tokens_per_s": results["batched"]["new_tokens_per_s"],
                "one_at_a_time_new_tokens_per_s": results["one_at_a_time"]["new_tokens_per_s"],
                "ratio": round(ratio, 2),
                "goal_ratio": 4.0,
                "identical_answers": f"{same}/{len(prompts)}",
                "dtype": dtype,
                "batched_flops": flops,
                "batched_tflops_per_s": round(achieved / 1e12, 4),
                "peak_tflops_per_s": round(peak / 1e12, 4),
                "batched_mfu": round(achieved / peak, 4),
                "goal_batched_mfu": 0.25,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "details": results,
            }
        )
    )


if __name__ == "__main__":
    main()
