"""Benchmark: a training row's causal attention on CPU, bf16 against fp32, forward + backward, side by
side in one run (``pipeline.stages.lora_adapter.attention``, the training's own function).

    python bench/attention_dtype.py [--heads 9] [--kv-heads 3] [--lengths 24,152,300,448,512,640,1024]

The training casts a bf16 row of at most ``FP32_MAX_TOKENS`` tokens up to fp32 for its attention
(PyTorch's CPU flash kernel is the slower in bf16 at those lengths, its backward above all). For
each length, the two dtypes alternate over ``--rounds`` rounds; printed: the median milliseconds of
each, their ratio and which the training picks. Last line, JSON: the same figures and the threshold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", default="24,152,300,448,512,640,1024")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import torch

    from pipeline.stages.lora_adapter import attention

    class Layer(torch.nn.Module):  # what the attention function reads from its module
        num_key_value_groups = args.heads // args.kv_heads
        is_causal = True

    layer, threshold = Layer(), attention.FP32_MAX_TOKENS
    torch.manual_seed(0)

    def run(length: int, fp32: bool) -> float:
        attention.FP32_MAX_TOKENS = length if fp32 else 0
        q = torch.randn(1, args.heads, length, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, args.kv_heads, length, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, args.kv_heads, length, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(1, length, args.heads, args.head_dim, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for i in range(2 + args.steps):
                if i == 2:
                    start = time.perf_counter()
                out, _ = attention.packed_attention(layer, q, k, v, None, row_lengths=[length])
                out.backward(grad)
        return (time.perf_counter() - start) / args.steps * 1e3

    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        times = {"bf16": [], "fp32": []}
        for _ in range(args.rounds):
            times["bf16"].append(run(length, False))
            times["fp32"].append(run(length, True))
        bf16, fp32 = statistics.median(times["bf16"]), statistics.median(times["fp32"])
        picked = "fp32" if length <= threshold else "bf16"
        rows.append(
            {
                "tokens": length,
                "bf16_ms": round(bf16, 2),
                "fp32_ms": round(fp32, 2),
                "fp32_over_bf16": round(fp32 / bf16, 2),
                "training_uses": picked,
            }
        )
        print(
            f"{length:5d} tokens: bf16 {bf16:7.2f} ms, fp32 {fp32:7.2f} ms, fp32/bf16 {fp32 / bf16:.2f}; the training "
            f"uses {picked}",
            flush=True,
        )
    attention.FP32_MAX_TOKENS = threshold
    print(
        json.dumps(
            {
                "fp32_max_tokens": threshold,
                "heads": args.heads,
                "kv_heads": args.kv_heads,
                "threads": torch.get_num_threads(),
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
