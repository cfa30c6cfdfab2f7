"""Cross-entropy at the supervised positions only, projected onto the vocabulary in chunks.

A causal LM's own loss projects every position onto the whole vocabulary (49k tokens for SmolLM2,
151k for Qwen) and keeps those logits for the backward pass, although prompt positions carry no
label. Here the decoder's last hidden states are gathered at the positions whose next token is
supervised, and :class:`LinearCrossEntropy` projects them ``chunk`` rows at a time, computing each
chunk's loss and its gradient with respect to the hidden states at once (as Liger's fused linear
cross-entropy does): memory holds one chunk of logits, never the whole batch's, and backward
needs no second projection.

Per-token losses are returned (fp32); the caller weighs and sums them. In fp32 they equal the
model's own loss to rounding (a test checks 1e-5). With bf16 weights the softmax is taken over the
bf16 logits, as the model's own loss does, and each token's reported loss carries bf16's relative
precision on its probability (about 0.004 nats).
"""

from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    """CE(hidden_i @ weight.T, target_i) for every i, for a frozen ``weight`` (no gradient for it)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        w = weight.to(hidden.dtype)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            rows = torch.arange(t.shape[0], device=t.device)
            # one fused pass over the logits in their own precision (the kernel accumulates in
            # fp32): an fp32 copy of a bf16 [chunk, vocab] block costs more than the matmul
            probs = torch.softmax(h @ w.T, dim=-1)
            losses[start : start + chunk] = -torch.log(
                probs[rows, t].float().clamp_min(torch.finfo(torch.float32).tiny)
            )
            if need_grad:
                probs[rows, t] -= 1  # d CE / d logits = softmax - one_hot(target)
                grad_hidden[start : start + chunk] = probs @ w
        if need_grad:
            ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None


def token_losses(
    hidden: torch.Tensor, head: torch.nn.Module, positions: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden[positions])`` against ``targets``, one fp32 value per target.

    ``hidden`` is [tokens, dim] (the decoder's output, flattened). A frozen ``nn.Linear`` head
    without bias (every causal LM here) takes the fused path; any other head (a trainable or
    LoRA-wrapped ``lm_head``) is applied chunk by chunk under activation checkpointing, so its
    logits are recomputed in backward instead of kept.
    """
    h = hidden.index_select(0, positions)
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return LinearCrossEntropy.apply(h, head.weight, targets, chunk)
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h_part, t_part):
        return torch.nn.functional.cross_entropy(head(h_part).float(), t_part, reduction="none")

    return torch.cat(
        [
            checkpoint(chunk_loss, h[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
            for s in range(0, h.shape[0], chunk)
        ]
    )
