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


def resolve_attention(attn_implementation: str, method: str = "lora") -> str:
    """``auto``: rows packed end to end, SDPA once per row (pipeline.stages.lora_adapter.attention);
    prompt-learning methods run each row over its virtual tokens' cache: plain SDPA."""
    from pipeline.stages.lora_adapter import attention
    from pipeline.stages.lora_adapter.methods import is_prompt_learning

    attention.register()
    if attn_implementation != "auto":
        return attn_implementation
    return "sdpa" if is_prompt_learning(method) else PACKED_ATTENTION


def load_for_training(spec, precision: str, on_gpu: bool, total_steps: int = 1):
    """The base model with a fresh adapter of ``spec.method`` (or, for ``full``, the model itself with
    every weight trainable, kept in fp32 as master weights), ready for :class:`SupervisedLM`."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    from pipeline.stages.lora_adapter.methods import (
        MethodError,
        check_method,
        is_prompt_learning,
        peft_config,
        quantization_config,
    )

    method = check_method(spec.method)
    attn = resolve_attention(spec.attn_implementation, method)
    quantized = quantization_config(spec, precision, on_gpu)
    extra = {}
    if quantized is not None:
        import os

        extra = {"quantization_config": quantized, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
    model = AutoModelForCausalLM.from_pretrained(
        spec.base_model_path,
        dtype=torch.float32 if method == "full" else DTYPES[precision],
        use_safetensors=True,
        trust_remote_code=spec.trust_remote_code,
        attn_implementation=attn,
        **extra,
    )
    model.config.use_cache = False
    if quantized is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # checkpointing: below
    if is_prompt_learning(method) and spec.gradient_checkpointing:
        raise MethodError(
            f"{method} runs the inputs over its virtual tokens' cache, which gradient checkpointing "
            f"does not keep: set gradient_checkpointing to false"
        )
    checkpointing = (on_gpu or method == "full") if spec.gradient_checkpointing is None else spec.gradient_checkpointing
    checkpointing = checkpointing and not is_prompt_learning(method)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = peft_config(spec, total_steps)
    if config is None:
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, config)  # adapter weights in fp32 (peft's autocast_adapter_dtype)
    if precision != "fp32":
        # peft casts each adapter's input up to fp32 (a copy of every activation, twice per layer);
        # under autocast the adapter's matmuls take the low-precision input as it is
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if (not on_gpu) if spec.compile is None else spec.compile:
        # the MLP and the norms (elementwise work inductor fuses); attention stays eager, as its
        # per-row loop would recompile for every new set of row lengths
        for layer in causal_lm_of(model).get_decoder().layers:
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                if hasattr(layer, name):
                    getattr(layer, name).compile(dynamic=True)
    return model, attn, checkpointing


def causal_lm_of(model):
    """The transformers model inside a PeftModel (or the model itself, for full fine-tuning)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SupervisedLM(torch.nn.Module):
    """One forward of a training step: the decoder over the packed rows, then the loss at the
    supervised positions only. Returns one fp32 loss per target. (A module of its own so that DDP
    and FSDP wrap the whole step.)"""

    def __init__(self, peft_model, attn_implementation: str, logits_chunk_tokens: int, method: str = "lora"):
        from pipeline.stages.lora_adapter.methods import is_prompt_learning

        super().__init__()
        self.peft_model = peft_model  # a PeftModel, or the plain model for full fine-tuning
        self.method = method
        self.prompt_learning = is_prompt_learning(method)
        self.packed = attn_implementation == PACKED_ATTENTION
        self.chunk = logits_chunk_tokens
        self._no_split_modules = getattr(causal_lm_of(peft_model), "_no_split_modules", None)

    def forward(self, input_ids, position_ids, positions, targets, row_lengths=None):
        causal_lm = causal_lm_of(self.peft_model)
        decoder = causal_lm.get_decoder()
        if self.prompt_learning:
            # each row over its own copy of the virtual tokens' cache; the rows' hidden states laid
            # end to end again, as the packed layout the positions point into
            from pipeline.stages.lora_adapter.methods import virtual_prefix

            hidden, start = [], 0
            for n in row_lengths or (input_ids.shape[1],):
                cache = virtual_prefix(self.peft_model, 1)
                hidden.append(
                    decoder(
                        input_ids=input_ids[:, start : start + n], past_key_values=cache, use_cache=True
                    ).last_hidden_state
                )
                start += n
            hidden = torch.cat(hidden, dim=1)
        else:
            extra = {"row_lengths": row_lengths} if self.packed else {}
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).last_hidden_state
        return token_losses(hidden.flatten(0, 1), causal_lm.get_output_embeddings(), positions, targets, self.chunk)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters; tied weights counted once."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())  # deduplicated: tied weights appear once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_pissa_init(peft_model, folder: Path) -> None:
    """PiSSA moves the principal components out of the base weights; the adapter as initialised is
    kept so that the trained one can be saved as an adapter over the *original* base
    (peft's ``path_initial_model_for_weight_conversion``). Written once; a resume reuses it."""
    from pipeline.core.atomic import atomic_dir

    if (folder / "adapter_config.json").is_file():
        return
    config = peft_model.peft_config["default"]
    with atomic_dir(folder) as tmp:
        config.init_lora_weights = True  # as peft's PiSSA example: saved as a plain LoRA adapter
        try:
            peft_model.save_pretrained(tmp, safe_serialization=True)
        finally:
            config.init_lora_weights = "pissa"


def save_trained(model, folder: Path, method: str, checkpoint_dir: Path, state_dict: dict | None = None) -> None:
    """The training's output: an adapter folder (peft's format; for PiSSA converted to apply to the
    original base weights), or for ``full`` the whole model (safetensors, fp32). ``state_dict``: the
    whole model's, gathered from the processes that hold its shards (FSDP, DeepSpeed)."""
    from pipeline.stages.lora_adapter.methods import PISSA_INIT

    given = {} if state_dict is None else {"state_dict": state_dict}
    if method == "full":
        model.config.use_cache = True
        model.save_pretrained(folder, safe_serialization=True, **given)
        return
    if method == "pissa":
        model.save_pretrained(
            folder,
            safe_serialization=True,
            path_initial_model_for_weight_conversion=str(checkpoint_dir / PISSA_INIT),
            **given,
        )
        return
    model.save_pretrained(folder, safe_serialization=True, **given)
