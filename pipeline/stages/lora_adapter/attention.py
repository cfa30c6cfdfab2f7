"""Attention over padding-free packed rows: each row attends only to itself.

A packed batch is one sequence of several rows laid end to end (batch dimension 1, no padding),
with position ids that restart at 0 for each row. The attention function registered here as
``"medtune_packed"`` receives the rows' lengths (``row_lengths``, plain ints known when the batch
was built, so nothing is read back from the device) and runs PyTorch's scaled-dot-product
attention once per row with ``is_causal=True``: the fused causal kernel (flash attention on CPU
and GPU) with no T x T mask and no work across rows. The position ids give every row its own
rotary positions, so a packed row computes exactly what it computes alone.

Registered under its own name, transformers builds no attention mask for it at all (see
``transformers.masking_utils._preprocess_mask_arguments``): a padded batch with an attention mask
must use ``"sdpa"`` instead; :func:`packed_attention` refuses a mask rather than ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence

NAME = "medtune_packed"


def packed_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, row_lengths: Sequence[int] | None = None, **kwargs
):
    """query [1, heads, T, dim], key/value [1, kv_heads, T, dim] → ([1, T, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None:
        raise ValueError(f"{NAME} attention takes packed rows without a mask; use 'sdpa' for padded batches")
    if row_lengths is None or len(row_lengths) <= 1:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    outputs, start = [], 0
    for n in row_lengths:
        part = slice(start, start + n)
        out, _ = sdpa_attention_forward(
            module, query[:, :, part], key[:, :, part], value[:, :, part], None, dropout=dropout, scaling=scaling, is_causal=True
        )
        outputs.append(out)
        start += n
    if start != query.shape[2]:
        raise ValueError(f"row lengths add up to {start}, the packed sequence holds {query.shape[2]} tokens")
    import torch

    return torch.cat(outputs, dim=1), None


def register() -> str:
    """Make ``attn_implementation="medtune_packed"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
