"""Fine-tuning methods: which weights a training changes, as peft configurations.

``method`` (a ``TrainSpec`` setting) picks one:

=================  ==============================================================  =========
method             what it trains                                                  mergeable
=================  ==============================================================  =========
``lora``           low-rank ``B @ A`` beside each target linear layer               yes
``dora``           LoRA plus a learned magnitude per output channel (DoRA)          yes
``rslora``         LoRA scaled by ``alpha / sqrt(r)`` (rank-stabilised)             yes
``pissa``          LoRA started from the weights' principal singular vectors        yes
``loha``           Hadamard product of two low-rank pairs (LyCORIS LoHa)            yes
``lokr``           Kronecker product of a small and a low-rank factor (LoKr)        yes
``adalora``        SVD-form LoRA whose rank budget is reallocated while training   yes
``ia3``            one learned scale per channel of the target layers' outputs     yes
``prompt_tuning``  ``num_virtual_tokens`` learned input embeddings                  no
``prefix_tuning``  learned keys and values of virtual tokens at every layer         no
``p_tuning``       virtual-token embeddings produced by a small MLP encoder         no
``full``           every weight of the model (no adapter)                           (is the model)
=================  ==============================================================  =========

The LoRA family and LoHa/LoKr use ``r``, ``lora_alpha``, ``lora_dropout`` and ``target_modules``;
AdaLoRA takes ``r`` as its target rank and starts from ``adalora_init_r``; IA3 uses
``target_modules``; the prompt-learning methods use ``num_virtual_tokens`` (and P-tuning
``prompt_encoder_hidden_size``). The training loop is the same for all; what differs is here:
the peft config, the optimizer's default, the per-step hook (AdaLoRA's rank allocation) and the
extra loss term (AdaLoRA's orthogonality regulariser).
"""

from __future__ import annotations

import math

ADAPTER_METHODS = ("lora", "dora", "rslora", "pissa", "loha", "lokr", "adalora", "ia3")
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")
METHODS = (*ADAPTER_METHODS, *PROMPT_LEARNING, "full")
MERGEABLE = ADAPTER_METHODS
PISSA_INIT = "pissa-init"  # the PiSSA adapter as initialised, under the checkpoint folder


class MethodError(ValueError):
    pass


def check_method(method: str) -> str:
    if method not in METHODS:
        raise MethodError(f"unknown fine-tuning method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def is_prompt_learning(method: str) -> bool:
    return method in PROMPT_LEARNING


def _targets(spec):
    return (
        spec.target_modules
        if spec.target_modules == "all-linear"
        else [m.strip() for m in spec.target_modules.split(",")]
    )


def adalora_schedule(spec, total_steps: int) -> dict[str, int]:
    """AdaLoRA's phases in steps: ``tinit`` warm-up steps at the initial rank, then the budget falls to
    ``r`` until ``total_steps - tfinal``, then ranks stay fixed."""
    tinit = int(spec.adalora_tinit * total_steps)
    tfinal = int(spec.adalora_tfinal * total_steps)
    if total_steps - tinit - tfinal <= 0:
        tinit, tfinal = 0, 0
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, spec.adalora_delta_t), "total_step": total_steps}


def peft_config(spec, total_steps: int):
    """The peft config of ``spec.method`` (None for ``full``)."""
    import peft

    method = check_method(spec.method)
    common = {"task_type": "CAUSAL_LM"}
    if method in ("lora", "dora", "rslora", "pissa"):
        return peft.LoraConfig(
            r=spec.r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=_targets(spec),
            use_dora=method == "dora",
            use_rslora=method == "rslora",
            init_lora_weights="pissa" if method == "pissa" else True,
            **common,
        )
    if method == "loha":
        return peft.LoHaConfig(
            r=spec.r, alpha=spec.lora_alpha, module_dropout=spec.lora_dropout, target_modules=_targets(spec), **common
        )
    if method == "lokr":
        return peft.LoKrConfig(
            r=spec.r, alpha=spec.lora_alpha, module_dropout=spec.lora_dropout, target_modules=_targets(spec), **common
        )
    if method == "adalora":
        init_r = spec.adalora_init_r or math.ceil(spec.r * 1.5)
        return peft.AdaLoraConfig(
            target_r=spec.r,
            init_r=init_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=_targets(spec),
            orth_reg_weight=spec.adalora_orth_reg_weight,
            **adalora_schedule(spec, total_steps),
            **common,
        )
    if method == "ia3":
        return peft.IA3Config(target_modules=_targets(spec), feedforward_modules=[], **common)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, **common)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, **common)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(
            num_virtual_tokens=spec.num_virtual_tokens, encoder_hidden_size=spec.prompt_encoder_hidden_size, **common
        )
    return None


def optimizer_name(spec) -> str:
    """``auto``: AdamW for adapters (small states); Adafactor for ``full`` (factored second moments,
    no first moment: the states of a full model would otherwise take twice its fp32 size)."""
    if spec.optimizer != "auto":
        return spec.optimizer
    return "adafactor" if spec.method == "full" else "adamw"


def make_optimizer(spec, params, on_gpu: bool):
    import torch

    name = optimizer_name(spec)
    if name == "adamw":
        # fused on CPU too (torch >= 2.4): one kernel over all the adapter's tensors, not a loop
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=spec.learning_rate,
            weight_decay=spec.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise MethodError("optimizer adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from exc
        return bnb.optim.AdamW8bit(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    raise MethodError(f"unknown optimizer {name!r}; choose auto, adamw, adafactor or adamw_8bit")


def after_optimizer_step(peft_model, method: str, step: int) -> None:
    """AdaLoRA: score the singular values and mask ranks to the current budget (gradients still set)."""
    if method == "adalora":
        peft_model.base_model.update_and_allocate(step)


def extra_loss(peft_model, method: str):
    """AdaLoRA's orthogonality regulariser on P and Q (peft adds it inside its own forward, which the
    training step does not call): ``weight * mean ||P P^T - I||_F``. None for other methods."""
    if method != "adalora":
        return None
    import torch

    config = peft_model.peft_config[peft_model.active_adapter]
    if not config.orth_reg_weight:
        return None
    total, count = 0.0, 0
    for name, p in peft_model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return config.orth_reg_weight * total / max(count, 1)


def method_state(peft_model, method: str) -> dict:
    """What a checkpoint must keep beyond the weights for an exact resume (AdaLoRA's importance
    scores and rank pattern)."""
    if method != "adalora":
        return {}
    alloc = peft_model.base_model.rankallocator
    return {
        "ipt": alloc.ipt,
        "exp_avg_ipt": alloc.exp_avg_ipt,
        "exp_avg_unc": alloc.exp_avg_unc,
        "rank_pattern": peft_model.peft_config[peft_model.active_adapter].rank_pattern,
    }


def load_method_state(peft_model, method: str, state: dict) -> None:
    if method != "adalora" or not state:
        return
    alloc = peft_model.base_model.rankallocator
    alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
    peft_model.peft_config[peft_model.active_adapter].rank_pattern = state["rank_pattern"]


def virtual_prefix(peft_model, batch_size: int = 1):
    """A prompt-learning adapter's virtual tokens as a KV cache the real tokens then run over.

    Prefix tuning's learned keys and values are that cache already; prompt tuning's and P-tuning's
    virtual embeddings are run through the decoder once (the real tokens attend to them, they never
    attend to the real tokens). Running the inputs over this cache computes what peft's own forward
    computes on ``[virtual embeddings, inputs]`` (a test compares the logits), but lets the
    training step keep its own loss, and evaluation its KV-cache tricks. Differentiable: gradients
    reach the prompt encoder."""
    config = peft_model.active_peft_config
    if config.peft_type.value == "PREFIX_TUNING":
        return peft_model.get_prompt(batch_size, max_cache_len=config.num_virtual_tokens)
    decoder = peft_model.get_base_model().get_decoder()
    prompts = peft_model.get_prompt(batch_size=batch_size)
    prompts = prompts.to(decoder.get_input_embeddings().weight.dtype)
    return decoder(inputs_embeds=prompts, use_cache=True).past_key_values


def quantization_config(spec, precision: str, on_gpu: bool):
    """QLoRA's base: 4-bit NF4 weights with double quantization, computing in the training dtype
    (bitsandbytes). Only the frozen base is quantized; export merges into the full-precision base.
    None when ``quantization`` is ``none``; a clear refusal where it cannot run."""
    if spec.quantization == "none":
        return None
    if spec.quantization != "nf4":
        raise MethodError(f"unknown quantization {spec.quantization!r}; choose none or nf4")
    if spec.method in PROMPT_LEARNING or spec.method == "full":
        raise MethodError(f"quantization nf4 is QLoRA: it trains adapters over a frozen 4-bit base, not {spec.method}")
    if not on_gpu:
        raise MethodError(
            "quantization nf4 (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit training kernels run there; "
            "on this machine train over the full-precision base (quantization: none)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MethodError("quantization nf4 (QLoRA) needs bitsandbytes: pip install bitsandbytes") from exc
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32),
    )
