"""LoRA weight arithmetic that evaluation and export share: which layers are plain LoRA, their
merged weight computed exactly (float64, rounded once), and a model run with those weights merged
in place for a while."""

from __future__ import annotations

import contextlib


def is_plain_lora(module, name: str) -> bool:
    """A LoRA layer whose delta is ``scaling · B @ A`` on a ``Linear`` (not DoRA, AdaLoRA, fan-in-fan-out)."""
    import torch
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    return (
        isinstance(module, LoraLayer)
        and not isinstance(module, AdaLoraLayer)
        and name in module.lora_A
        and isinstance(module.get_base_layer(), torch.nn.Linear)
        and not module.use_dora.get(name, False)
        and not getattr(module, "fan_in_fan_out", False)
        and not getattr(module, "lora_bias", {}).get(name, False)
    )


def exact_lora_weight(module, name: str):
    """``W + scaling · B @ A`` computed in float64 and rounded once to ``W``'s dtype (a new tensor)."""
    import torch

    weight = module.get_base_layer().weight.detach()
    a = module.lora_A[name].weight.detach().to(weight.device, torch.float64)
    b = module.lora_B[name].weight.detach().to(weight.device, torch.float64)
    return (weight.to(torch.float64) + (b @ a) * float(module.scaling[name])).to(weight.dtype)


@contextlib.contextmanager
def lora_merged(model):
    """Inside: every plain LoRA layer of a ``PeftModel`` runs as one merged weight (``W + s·B·A`` in
    float64, rounded once to the weight's dtype: the export's own arithmetic), the adapter's two
    extra products per layer gone; afterwards the original weights are back, untouched. Other
    layers (DoRA, LoHa, ...) and other models run as they are."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped = []
    try:
        for module in model.modules():
            if not isinstance(module, BaseTunerLayer) or module.merged or len(module.active_adapters) != 1:
                continue
            names = list(module.active_adapters)
            if not is_plain_lora(module, names[0]):
                continue
            base_layer = module.get_base_layer()
            original = base_layer.weight
            base_layer.weight = torch.nn.Parameter(exact_lora_weight(module, names[0]), requires_grad=False)
            module.merged_adapters.append(names[0])
            swapped.append((module, base_layer, original, names[0]))
        yield len(swapped)
    finally:
        for module, base_layer, original, name in swapped:
            base_layer.weight = original
            module.merged_adapters.remove(name)
