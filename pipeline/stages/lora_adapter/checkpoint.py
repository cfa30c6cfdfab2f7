"""Checkpoints: adapter weights, optimizer, scheduler, RNG state and the position in the data,
written atomically; ``trainer_state.json`` is written last and marks a checkpoint complete."""

from __future__ import annotations

import json
from pathlib import Path


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    done = [p for p in checkpoint_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def trained_weights(model, method: str) -> dict:
    """The weights a training changes: the adapter's (peft's state dict), or every trainable one for ``full``."""
    from peft import get_peft_model_state_dict

    if method == "full":
        return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict, method: str = "lora") -> None:
    import torch
    from safetensors.torch import save_file

    from pipeline.core.atomic import atomic_dir
    from pipeline.stages.lora_adapter.methods import method_state

    with atomic_dir(path) as tmp:
        save_file(trained_weights(model, method), tmp / "adapter_model.safetensors")
        extra = method_state(model, method)
        if extra:
            torch.save(extra, tmp / "method_state.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # written last: marks it complete


def load_checkpoint(path: Path, model, optimizer, scheduler, method: str = "lora") -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from pipeline.stages.lora_adapter.methods import load_method_state

    weights = load_file(path / "adapter_model.safetensors")
    if method == "full":
        missing = set(weights) - {n for n, _ in model.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint {path} holds weights the model lacks: {sorted(missing)[:5]}")
        model.load_state_dict(weights, strict=False)
    else:
        set_peft_model_state_dict(model, weights)
    if (path / "method_state.pt").is_file():
        load_method_state(model, method, torch.load(path / "method_state.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
