"""Multi-GPU launches: the accelerate configs shipped in ``pipeline/presets/accelerate/`` and the
checks made before a launch, so that a setting that cannot run here says why instead of failing
inside the launcher.

``lora_adapter.accelerate_config`` takes a preset name (``fsdp``, ``deepspeed-zero2``,
``deepspeed-zero3``) or a path to an accelerate config file. FSDP and DeepSpeed need GPUs:
accelerate refuses FSDP without an accelerator device ("There are currently no available devices
found"), and DeepSpeed is a separate install that builds CUDA kernels. On a machine without a
GPU they are refused before anything starts; DDP over several CPU processes (``num_processes``
with ``torchrun``, gloo) is what runs there.
"""

from __future__ import annotations

from pathlib import Path

PRESETS = Path(__file__).parents[3] / "pipeline" / "presets" / "accelerate"


class LaunchError(ValueError):
    pass


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(value: str) -> Path | None:
    """The shipped config named ``value`` (``fsdp``, ``deepspeed-zero3``...), or None."""
    path = PRESETS / f"{value}.yaml"
    return path if "/" not in value and path.is_file() else None


def check_accelerate_config(path: str | Path, on_gpu: bool, deepspeed_installed: bool | None = None) -> str:
    """The config's distributed type (``FSDP``, ``DEEPSPEED``, ``MULTI_GPU``, ...), after checking it
    loads and can run on this machine; :class:`LaunchError` saying why not."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(str(path))
    except Exception as exc:  # accelerate raises several kinds for a malformed file
        raise LaunchError(f"accelerate config {path} does not load: {type(exc).__name__}: {exc}") from None
    kind = str(getattr(config.distributed_type, "value", config.distributed_type))
    from accelerate.utils import DistributedType

    if kind not in {t.value for t in DistributedType}:
        raise LaunchError(f"accelerate config {path}: unknown distributed_type {config.distributed_type!r} "
                          f"(one of {', '.join(t.value for t in DistributedType)})")
    if kind in ("FSDP", "DEEPSPEED") and not on_gpu:
        raise LaunchError(f"accelerate config {Path(path).name} uses {kind}, which needs GPUs; this machine has none. "
                          f"Several CPU processes train with DDP instead: set num_processes and leave accelerate_config unset")
    if kind == "DEEPSPEED":
        if deepspeed_installed is None:
            import importlib.util

            deepspeed_installed = importlib.util.find_spec("deepspeed") is not None
        if not deepspeed_installed:
            raise LaunchError(f"accelerate config {Path(path).name} uses DeepSpeed: pip install deepspeed on the GPU machine")
    return kind
