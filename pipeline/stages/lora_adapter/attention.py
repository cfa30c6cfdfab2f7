"""Attention over padding-free packed rows: each row attends only to itself.

A packed batch is one sequence of several rows laid end to end (batch dimension 1, no padding),
with position ids that restart at 0 for each row. The attention function registered here as
``"medtune_packed"`` receives the rows' lengths (``row_lengths``, plain ints known when the batch
was built, so nothing is read back from the device) and runs PyTorch's scaled-dot-product
attention once per row with ``is_causal=True``: the fused causal kernel (flash attention on CPU
and GPU) with no T x T mask and no work across rows. The position ids give every row its own
rotary positions, so a packed row computes exactly what it computes alone.

On CPU, a bf16 row of at most ``FP32_MAX_TOKENS`` tokens runs its attention in fp32 (the inputs
cast up, the output back to bf16): PyTorch's CPU flash kernel is slower in bf16 than in fp32 at
these lengths, its backward above all. Measured here (2 cores, SmolLM2-135M's 9 query and 3
key/value heads, forward + backward of one row, medians side by side): 24 tokens 1.32 ms in bf16
against 0.52 in fp32, 152 tokens 5.80 against 3.26, 300 tokens 10.8 against 9.1, 448 tokens 18.5
against 17.5; from 512 tokens on bf16 is the faster (640: 28.3 against 29.1, 1024: 54.9 against
65.0). On GPU, and for rows in fp32 or fp16, nothing changes. ``bench/attention_dtype.py`` measures it side by side.

Registered under its own name, transformers builds no attention mask for it at all (see
``transformers.masking_utils._preprocess_mask_arguments``): a padded batch with an attention mask
must use ``"sdpa"`` instead; :func:`packed_attention` refuses a mask rather than ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence

NAME = "medtune_packed"
FP32_MAX_TOKENS = 448  # CPU bf16 rows up to this length run their attention in fp32 (see above)


def packed_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    row_lengths: Sequence[int] | None = None,
    **kwargs,
):
    """query [1, heads, T, dim], key/value [1, kv_heads, T, dim] → ([1, T, heads, dim], None)."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention takes packed rows without a mask; use 'sdpa' for padded batches")
    if row_lengths is None or len(row_lengths) <= 1:
        return _causal(module, query, key, value, dropout, scaling), None
    outputs, start = [], 0
    for n in row_lengths:
        part = slice(start, start + n)
        outputs.append(_causal(module, query[:, :, part], key[:, :, part], value[:, :, part], dropout, scaling))
        start += n
    if start != query.shape[2]:
        raise ValueError(f"row lengths add up to {start}, the packed sequence holds {query.shape[2]} tokens")
    import torch

    return torch.cat(outputs, dim=1), None


def _causal(module, query, key, value, dropout, scaling):
    """One row's causal attention, [1, T, heads, dim]: in fp32 for a short bf16 row on CPU."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and query.shape[2] <= FP32_MAX_TOKENS:
        with torch.autocast("cpu", enabled=False):
            out, _ = sdpa_attention_forward(
                module,
                query.float(),
                key.float(),
                value.float(),
                None,
                dropout=dropout,
                scaling=scaling,
                is_causal=True,
            )
        return out.to(query.dtype)
    out, _ = sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    return out


ROWS_NAME = "medtune_rows"


def rows_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    row_starts: Sequence[int] | None = None,
    **kwargs,
):
    """A decode step over left-padded caches, each row on its own: query [B, heads, 1, dim] and
    key/value [B, kv_heads, W, dim], row b's keys from ``row_starts[b]`` on (its padding left out,
    so no mask); → ([B, 1, heads, dim], None). A row's result is the same whatever else is in the
    batch: padded attention reduces over the batch's width, and a row's sum then depends on it."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if row_starts is None or query.shape[2] != 1:
        raise ValueError(f"{ROWS_NAME} attention takes one new token per row and each row's start")
    outputs = [
        sdpa_attention_forward(
            module,
            query[b : b + 1],
            key[b : b + 1, :, s:],
            value[b : b + 1, :, s:],
            None,
            scaling=scaling,
            is_causal=False,
        )[0]
        for b, s in enumerate(row_starts)
    ]
    return torch.cat(outputs, dim=0), None


def register() -> str:
    """Make ``attn_implementation="medtune_packed"`` (and ``"medtune_rows"``) known to transformers
    (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionInterface.register(ROWS_NAME, rows_attention)
    return NAME
