"""IO manager for the data stages: Arrow IPC files for tables (a stage folder), JSON for small descriptors.

A data stage writes its own folder ``<asset>/`` (``kept.arrow``, ``rejected.arrow``,
``stats.json``: :class:`~pipeline.core.records.StagedRows`, written chunk by chunk and renamed
into place whole by the stage); the IO manager hands the next stage a pointer to it. Anything
else is stored as ``<asset>.json``, written to a temporary name and renamed into place, so a
failed step never leaves a half-written output for the next step to read.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from pipeline.core.atomic import write_bytes_atomic
from pipeline.core.records import KEPT_FILE, StagedRows
from resources.data_root import DataRoot


class StageIOManager(ConfigurableIOManager):
    data_root: ResourceDependency[DataRoot]

    def _base(self, context: InputContext | OutputContext) -> Path:
        key = context.asset_key.path if context.has_asset_key else [context.name]
        return self.data_root.stages_dir.joinpath(*key)

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        base = self._base(context)
        if isinstance(obj, StagedRows):
            if Path(obj.folder).resolve() != base.resolve():
                raise ValueError(f"{context.asset_key.to_user_string()} wrote its rows to {obj.folder}, not {base}")
            return  # the stage wrote its folder itself, chunk by chunk
        if dataclasses.is_dataclass(obj):
            payload = {"__dataclass__": f"{type(obj).__module__}:{type(obj).__qualname__}", **dataclasses.asdict(obj)}
        else:
            payload = obj
        write_bytes_atomic(base.with_suffix(".json"), json.dumps(payload, ensure_ascii=False, indent=1, default=str).encode())

    def load_input(self, context: InputContext) -> Any:
        base = self._base(context.upstream_output)
        if base.is_dir():
            if not (base / KEPT_FILE).is_file():
                raise FileNotFoundError(
                    f"{base} was written by an older MedTune (no {KEPT_FILE}): materialize {context.upstream_output.asset_key.to_user_string()} again"
                )
            return StagedRows.load(base)
        path = base.with_suffix(".json")
        if not path.is_file():
            raise FileNotFoundError(f"{context.upstream_output.asset_key.to_user_string()} has not been materialized ({path} missing)")
        payload = json.loads(path.read_text())
        if isinstance(payload, dict) and "__dataclass__" in payload:
            import importlib

            module, _, name = payload.pop("__dataclass__").partition(":")
            cls = getattr(importlib.import_module(module), name)
            return cls(**payload)
        return payload
