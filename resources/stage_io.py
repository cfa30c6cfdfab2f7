"""IO manager for the data stages: Parquet for tables, JSON for small descriptors.

A :class:`~pipeline.core.records.StageResult` is stored as a folder ``<asset>/`` holding
``kept.parquet``, ``rejected.parquet`` and ``stats.json``; anything else as ``<asset>.json``.
Both are written to a temporary name and renamed into place, so a failed step never leaves a
half-written output for the next step to read.
"""


import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import ConfigurableIOManager, InputContext, OutputContext, ResourceDependency

from pipeline.core.atomic import atomic_dir, write_bytes_atomic
from pipeline.core.records import StageResult
from pipeline.stages.alpaca_dataset import to_arrow
from resources.data_root import DataRoot

import pyarrow.parquet as pq


class StageIOManager(ConfigurableIOManager):
    data_root: ResourceDependency[DataRoot]

    def _base(self, context: InputContext | OutputContext) -> Path:
        key = context.asset_key.path if context.has_asset_key else [context.name]
        return self.data_root.stages_dir.joinpath(*key)

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        base = self._base(context)
        if isinstance(obj, StageResult):
            with atomic_dir(base) as tmp:
                pq.write_table(to_arrow(obj.kept), tmp / "kept.parquet", compression="zstd")
                pq.write_table(to_arrow(obj.rejected), tmp / "rejected.parquet", compression="zstd")
                (tmp / "stats.json").write_text(json.dumps(obj.stats, ensure_ascii=False, indent=1, default=str))
            context.add_output_metadata({"stage_output": str(base)})
            return
        if dataclasses.is_dataclass(obj):
            payload = {"__dataclass__": f"{type(obj).__module__}:{type(obj).__qualname__}", **dataclasses.asdict(obj)}
        else:
            payload = obj
        write_bytes_atomic(base.with_suffix(".json"), json.dumps(payload, ensure_ascii=False, indent=1, default=str).encode())

    def load_input(self, context: InputContext) -> Any:
        base = self._base(context.upstream_output)
        if base.is_dir():
            stats = json.loads((base / "stats.json").read_text())
            return StageResult(
                kept=pd.read_parquet(base / "kept.parquet"),
                rejected=pd.read_parquet(base / "rejected.parquet"),
                stats=stats,
            )
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
