"""Model set-up for training: the base model in its training precision, the LoRA adapter, the
attention over packed rows, and :class:`SupervisedLM`, the module one training step calls.

Precision. The frozen base weights are held in the compute dtype (bf16 where the CPU or GPU
supports it, fp16 on GPUs without bf16, else fp32): no fp32 copy is re-cast at every step. The
LoRA weights, their gradients and the optimizer states stay fp32 (peft keeps adapter weights in
fp32 over a low-precision base); autocast runs their matmuls in the compute dtype. Export does
not see any of this: ``merged_model`` merges into the original fp32 weights in float64.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.stages.lora_adapter.attention import NAME as PACKED_ATTENTION
from pipeline.stages.lora_adapter.loss import token_losses

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, on_gpu: bool) -> str:
    if precision != "auto":
        return precision
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def resolve_attention(attn_implementation: str) -> str:
    """``auto``: rows packed end to end, SDPA once per row (pipeline.stages.lora_adapter.attention)."""
    from pipeline.stages.lora_adapter import attention

    attention.register()
    return PACKED_ATTENTION if attn_implementation == "auto" else attn_implementation


def load_for_training(spec, precision: str, on_gpu: bool):
    """The base model with a fresh LoRA adapter, ready for :class:`SupervisedLM`."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    attn = resolve_attention(spec.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        spec.base_model_path,
        dtype=DTYPES[precision],
        use_safetensors=True,
        trust_remote_code=spec.trust_remote_code,
        attn_implementation=attn,
    )
    model.config.use_cache = False
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
    model = get_peft_model(model, lora)  # adapter weights in fp32 (peft's autocast_adapter_dtype)
    if precision != "fp32":
        # peft casts each adapter's input up to fp32 (a copy of every activation, twice per layer);
        # under autocast the adapter's matmuls take the low-precision input as it is
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if (not on_gpu) if spec.compile is None else spec.compile:
        # the MLP and the norms (elementwise work inductor fuses); attention stays eager, as its
        # per-row loop would recompile for every new set of row lengths
        for layer in model.get_base_model().get_decoder().layers:
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                if hasattr(layer, name):
                    getattr(layer, name).compile(dynamic=True)
    return model, attn, checkpointing


class SupervisedLM(torch.nn.Module):
    """One forward of a training step: the decoder over the packed rows, then the loss at the
    supervised positions only. Returns one fp32 loss per target. (A module of its own so that DDP
    and FSDP wrap the whole step.)"""

    def __init__(self, peft_model, attn_implementation: str, logits_chunk_tokens: int):
        super().__init__()
        self.peft_model = peft_model
        self.packed = attn_implementation == PACKED_ATTENTION
        self.chunk = logits_chunk_tokens
        self._no_split_modules = getattr(peft_model.get_base_model(), "_no_split_modules", None)

    def forward(self, input_ids, position_ids, positions, targets, row_lengths=None):
        causal_lm = self.peft_model.get_base_model()
        extra = {"row_lengths": row_lengths} if self.packed else {}
        hidden = causal_lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).last_hidden_state
        return token_losses(hidden.flatten(0, 1), causal_lm.get_output_embeddings(), positions, targets, self.chunk)
