"""Launches past one process: the launcher command (one process, ``torchrun``, ``accelerate
launch``; one node or several), the accelerate configs shipped in ``pipeline/presets/accelerate/`` and the
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

import sys
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
        raise LaunchError(
            f"accelerate config {path}: unknown distributed_type {config.distributed_type!r} (one of "
            f"{', '.join(t.value for t in DistributedType)})"
        )
    if kind in ("FSDP", "DEEPSPEED") and not on_gpu:
        raise LaunchError(
            f"accelerate config {Path(path).name} uses {kind}, which needs GPUs; this machine has none. "
            f"Several CPU processes train with DDP instead: set num_processes and leave accelerate_config unset"
        )
    if kind == "DEEPSPEED":
        if deepspeed_installed is None:
            import importlib.util

            deepspeed_installed = importlib.util.find_spec("deepspeed") is not None
        if not deepspeed_installed:
            raise LaunchError(
                f"accelerate config {Path(path).name} uses DeepSpeed: pip install deepspeed on the GPU machine"
            )
    return kind


def launch_command(
    spec_path: Path,
    *,
    num_processes: int = 1,
    launcher: str = "auto",
    accelerate_config: str | None = None,
    num_nodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    run_id: str = "medtune",
) -> list[str]:
    """The command that runs the training child on this node.

    One process: ``python -m pipeline.stages.lora_adapter``. Several on one node: ``torchrun
    --standalone`` (DDP), or ``accelerate launch`` with an accelerate config. Several nodes: the same
    command on every node with its ``node_rank``, meeting at ``rdzv_endpoint`` (HOST:PORT of node 0;
    torchrun's c10d rendezvous, accelerate's main process address); ``run_id`` names the rendezvous
    (the adapter id), so two trainings never join each other."""
    entry = ["-m", "pipeline.stages.lora_adapter", "--spec", str(spec_path)]
    if num_nodes > 1 and not rdzv_endpoint:
        raise LaunchError(f"num_nodes {num_nodes}: set rdzv_endpoint to node 0's HOST:PORT (every node uses the same)")
    if not 0 <= node_rank < num_nodes:
        raise LaunchError(f"node_rank {node_rank} is not one of 0..{num_nodes - 1}")
    if num_processes <= 1 and num_nodes <= 1 and launcher == "auto":
        return [sys.executable, *entry]
    bindir = Path(sys.executable).parent
    if launcher == "accelerate" or (launcher == "auto" and accelerate_config):
        cmd = [str(bindir / "accelerate"), "launch", "--num_processes", str(num_processes * num_nodes)]
        if accelerate_config:
            cmd += ["--config_file", accelerate_config]
        if num_nodes > 1:
            host, _, port = rdzv_endpoint.rpartition(":")
            cmd += [
                "--num_machines",
                str(num_nodes),
                "--machine_rank",
                str(node_rank),
                "--main_process_ip",
                host,
                "--main_process_port",
                port,
            ]
        return [*cmd, *entry]
    cmd = [str(bindir / "torchrun")]
    if num_nodes > 1:
        cmd += [
            "--nnodes",
            str(num_nodes),
            "--node_rank",
            str(node_rank),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            rdzv_endpoint,
            "--rdzv_id",
            run_id,
        ]
    else:
        cmd += ["--standalone"]
    return [*cmd, "--nproc_per_node", str(num_processes), *entry]
