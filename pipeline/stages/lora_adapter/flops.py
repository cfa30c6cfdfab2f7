"""What a training step costs in arithmetic, and what the hardware can do: model FLOPs per token
from the model's config, and the matrix-multiply peak measured on the spot.

FLOPs of one trained token, for a decoder-only transformer with a frozen base and LoRA adapters
(2 FLOPs per multiply-add):

* linear layers (attention projections and the gated MLP): forward ``2·M`` plus the backward
  pass's input gradients ``2·M`` (frozen weights need no weight gradient), ``M`` = their weights;
* attention scores, causal: forward ``4·c·H·hd`` per layer (``QKᵀ`` and ``PV`` over ``c``, the mean
  number of earlier tokens a token attends to), backward twice that;
* the vocabulary projection ``d·V``, forward and input gradient, at supervised positions only
  (the step skips the others; ``nominal`` counts it at every position, as the usual 4·N does);
* the adapters: ``6·P`` (forward, input and weight gradients) for their ``P`` parameters;
* full fine-tuning (``full=True``): every linear layer and the vocabulary projection also compute
  their weight gradients, ``6·M`` and ``6·d·V`` instead of ``4·``, and there are no adapters.

MFU = achieved FLOP/s ÷ the peak of a large matrix multiply in the compute dtype, measured in the
same process (these CPUs differ from machine to machine by 2x, and a shared machine by the minute).
"""

from __future__ import annotations

import time


def config_shape(config) -> dict[str, int]:
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or d // heads
    return {
        "hidden": d,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": kv,
        "head_dim": hd,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def linear_weights_per_layer(shape: dict[str, int]) -> int:
    d, hd = shape["hidden"], shape["head_dim"]
    attn = d * shape["heads"] * hd * 2 + d * shape["kv_heads"] * hd * 2  # q, o; k, v
    mlp = 3 * d * shape["intermediate"]  # gate, up, down
    return attn + mlp


def mean_context(row_lengths: list[int]) -> float:
    """Token-weighted mean number of keys a query sees under a causal mask: (L + 1) / 2 per row."""
    total = sum(row_lengths)
    return sum(n * (n + 1) / 2 for n in row_lengths) / total if total else 0.0


def training_flops_per_token(
    config, *, context: float, supervised_share: float, adapter_params: int, full: bool = False
) -> dict[str, float]:
    s = config_shape(config)
    passes = 6 if full else 4
    linear = passes * s["layers"] * linear_weights_per_layer(s)
    attention = 12 * s["layers"] * context * s["heads"] * s["head_dim"]
    head = passes * s["hidden"] * s["vocab"]
    adapters = 0 if full else 6 * adapter_params
    return {
        "linear": linear,
        "attention": attention,
        "head": head * supervised_share,
        "adapters": adapters,
        "total": linear + attention + head * supervised_share + adapters,
        "nominal": linear + attention + head + adapters,
    }


_PEAKS: dict[tuple, float] = {}


def matmul_peak_flops(dtype, device: str = "cpu", n: int = 2048, seconds: float = 1.5) -> float:
    """Best FLOP/s of an n x n matrix multiply over a few repetitions (``seconds`` in all); measured
    once a process per dtype and device (a training child measures it once; tests that train many
    times in one process pay it once). It leaves the global random state as it was: whether the peak
    was measured in this process must not change a training's dropout masks."""
    key = (str(dtype), device, n)
    if key not in _PEAKS:
        _PEAKS[key] = _measure_peak(dtype, device, n, seconds)
    return _PEAKS[key]


def _measure_peak(dtype, device: str, n: int, seconds: float) -> float:
    import torch

    # its own generator: the global one is the training's (dropout), and measuring must not move it
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    a @ b
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        reps = 3 if device == "cpu" else 20
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best
