"""Checkpoints: adapter weights, optimizer, scheduler, every process's RNG state and the position
in the data, written atomically (every file fsynced before the folder is renamed into place); ``files.json``
records each file's size and sha256 and ``trainer_state.json``, written last, marks a checkpoint
complete. A resume skips a complete checkpoint whose files do not match their record for the one
before. Only the newest ``keep`` (at least two) complete checkpoints stay (the older ones are
removed once a new one is complete, never before).

With several processes every process calls :func:`save_checkpoint`: where the processes hold
shards of the model (FSDP, DeepSpeed ZeRO) gathering the weights takes all of them, and each
process's random state (and, sharded, its optimizer state) is sent to the main process, which
writes the checkpoint alone. DDP and one process are what run on this machine (tested with two
CPU processes); the FSDP and DeepSpeed branches follow accelerate's documented calls and were
never run here (``docs/training.md``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.core.atomic import TMP_PREFIX

WEIGHTS = "adapter_model.safetensors"
RNG = "rng.pt"


MANIFEST = "files.json"  # each file's size and sha256, written before trainer_state.json
MIN_KEPT = 2  # a checkpoint a power cut damaged falls back to the one before it


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (``trainer_state.json`` written), oldest first."""
    done = [p for p in checkpoint_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def write_manifest(folder: Path) -> None:
    from pipeline.core.fingerprint import sha256_file

    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir()) if p.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))


def damage(folder: Path) -> str | None:
    """Why a complete checkpoint cannot be trusted (a file empty, short or changed since it was
    written: what a power cut before the data reached the disk leaves), or None."""
    from pipeline.core.fingerprint import sha256_file

    manifest = folder / MANIFEST
    if not manifest.is_file():  # written before manifests: every file at least not empty
        empty = [p.name for p in folder.iterdir() if p.is_file() and p.stat().st_size == 0]
        return f"{', '.join(empty)} empty" if empty else None
    try:
        files = json.loads(manifest.read_text())
    except ValueError:
        return f"{MANIFEST} unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} holds {path.stat().st_size} bytes, not {want['bytes']}"
        if sha256_file(path) != want["sha256"]:
            return f"{name} changed since it was written"
    return None


def latest_checkpoint(checkpoint_dir: Path, warn=None) -> Path | None:
    """The newest complete checkpoint whose files are whole; a damaged one is skipped (``warn``
    says which and why) for the one before."""
    for path in reversed(complete_checkpoints(checkpoint_dir)):
        why = damage(path)
        if why is None:
            return path
        if warn is not None:
            warn(f"checkpoint {path} is damaged ({why}): skipped for the one before")
    return None


def rotate_checkpoints(checkpoint_dir: Path, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` (at least two) complete checkpoints; returns the names
    removed. A folder being written is not a complete checkpoint and is never touched."""
    done = complete_checkpoints(checkpoint_dir)
    removed = done[: max(len(done) - max(keep, MIN_KEPT), 0)]
    for path in removed:
        trash = path.with_name(f"{TMP_PREFIX}{path.name}.removed")  # gone from the list at once
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return [p.name for p in removed]


class TrainingStopped(RuntimeError):
    """The asset asked the training to stop (its reason in ``STOP_FILE``); a checkpoint was saved."""


def stop_request(ckpt_root: Path, what: str, log):
    """A function that asks the training writing into ``ckpt_root`` to stop at a checkpoint, saying why."""
    from pipeline.core.atomic import write_bytes_atomic
    from pipeline.stages.lora_adapter.spec import STOP_FILE

    def request(why: str) -> None:
        log(f"{what} was lost: {why}; asking the training to stop at a checkpoint")
        write_bytes_atomic(Path(ckpt_root) / STOP_FILE, f"{what} was lost: {why}".encode())

    return request


def stop_requested(ckpt_root: Path, accelerator) -> bool:
    """Whether ``STOP_FILE`` exists; with several processes, whether any of them sees it (they stop together)."""
    from pipeline.stages.lora_adapter.spec import STOP_FILE

    seen = (ckpt_root / STOP_FILE).is_file()
    if accelerator.num_processes == 1:
        return seen
    import torch

    flag = torch.tensor([1.0 if seen else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def sharded(accelerator) -> bool:
    """Do the processes hold shards of the model and optimizer (FSDP, DeepSpeed) rather than copies?"""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def gathered_state_dict(accelerator, model) -> dict | None:
    """The PeftModel's whole state dict where the processes hold shards of it: every process must
    call this (accelerate gathers the shards); the main process gets the dict. None where each
    process holds the whole model (one process, DDP): the model's own state dict is complete."""
    if not sharded(accelerator):
        return None
    full = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    return {k.removeprefix("peft_model."): v for k, v in full.items()}


def trained_weights(model, method: str, state_dict: dict | None = None) -> dict:
    """The weights a training changes: the adapter's (peft's state dict), or every trainable one for
    ``full``; from ``state_dict`` (the gathered whole model) where given."""
    from peft import get_peft_model_state_dict

    if method == "full":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        source = state_dict if state_dict is not None else dict(model.named_parameters())
        return {n: source[n].detach().cpu().contiguous() for n in names}
    weights = get_peft_model_state_dict(model, state_dict=state_dict)
    return {k: v.detach().cpu().contiguous() for k, v in weights.items()}


def _rng_state() -> dict:
    import torch

    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return rng


def _to_cpu(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(
    path: Path, accelerator, model, optimizer, scheduler, state: dict, method: str = "lora", keep: int | None = None
) -> list[str]:
    """Every process calls this. Writes ``path`` (from the main process, atomically), then keeps the
    newest ``keep`` checkpoints beside it. Returns the names of the checkpoints removed."""
    import torch
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from pipeline.core.atomic import atomic_dir
    from pipeline.stages.lora_adapter.methods import method_state

    world = accelerator.num_processes
    full = gathered_state_dict(accelerator, model)  # every process takes part where sharded
    bare = accelerator.unwrap_model(model).peft_model
    rngs = gather_object([_rng_state()]) if world > 1 else [_rng_state()]
    if sharded(accelerator):  # each process holds its own part of the optimizer's state
        optimizers = gather_object([_to_cpu(optimizer.state_dict())]) if world > 1 else [optimizer.state_dict()]
    else:  # the same on every process
        optimizers = [optimizer.state_dict()]
    removed: list[str] = []
    if accelerator.is_main_process:
        with atomic_dir(path) as tmp:
            save_file(trained_weights(bare, method, full), tmp / WEIGHTS)
            extra = method_state(bare, method)
            if extra:
                torch.save(extra, tmp / "method_state.pt")
            torch.save(
                {"processes": world, "sharded": sharded(accelerator), "states": optimizers}, tmp / "optimizer.pt"
            )
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"processes": world, "states": rngs}, tmp / RNG)
            write_manifest(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))  # written last: marks it complete
        if keep:
            removed = rotate_checkpoints(path.parent, keep)
    accelerator.wait_for_everyone()
    return removed


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler, method: str = "lora") -> dict:
    """Every process calls this: the weights, the optimizer (this process's part where sharded), the
    scheduler and this process's own random state."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from pipeline.stages.lora_adapter.methods import load_method_state

    bare = accelerator.unwrap_model(model).peft_model
    rank, world = accelerator.process_index, accelerator.num_processes
    weights = load_file(path / WEIGHTS)
    if method == "full":
        missing = set(weights) - {n for n, _ in bare.named_parameters()}
        if missing:
            raise ValueError(f"checkpoint {path} holds weights the model lacks: {sorted(missing)[:5]}")
        bare.load_state_dict(weights, strict=False)
    else:
        set_peft_model_state_dict(bare, weights)
    if (path / "method_state.pt").is_file():
        load_method_state(bare, method, torch.load(path / "method_state.pt", weights_only=True))
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    if "states" not in saved:  # a checkpoint written before per-process states
        saved = {"processes": 1, "sharded": False, "states": [saved]}
    if saved["sharded"] and saved["processes"] != world:
        raise ValueError(
            f"checkpoint {path} holds the optimizer sharded over {saved['processes']} processes; resume it with "
            f"{saved['processes']}, not {world}"
        )
    optimizer.load_state_dict(saved["states"][rank if saved["sharded"] else 0])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / RNG, weights_only=True)
    states = rng["states"] if "states" in rng else [rng]
    if len(states) != world:
        raise ValueError(
            f"checkpoint {path} was written by {len(states)} process(es); resuming it exactly needs "
            f"the same number, not {world} (remove {path.parent} to start over)"
        )
    mine = states[rank]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
