"""IO manager for the assets: each run's outputs in a folder of its own, handed on by run.

A data stage writes its rows into ``processed/runs/<run id>/<asset>/`` (``kept.arrow``,
``rejected.arrow``, ``stats.json``: :class:`~pipeline.core.records.StagedRows`, written chunk by
chunk and renamed into place whole by the stage). Every output's descriptor (a small dataclass or
dict, or a pointer to a stage folder) is written as ``processed/runs/<run id>/<asset>.json`` and
copied to ``processed/stages/<asset>.json``, the latest, for people and ``make ask``.

A step reads its upstream's descriptor from the run that produced it: its own run, or the parent
run of a re-execution. An upstream not materialized in this run is the one Dagster shows as the
latest materialization; the first step that reads it pins it into this run's folder, so every later
step of the run reads the same one, whatever other runs write meanwhile. Nothing a run wrote is
rewritten, so no run reads another run's half-finished or newer data
(docs/reliability.md#one-run-one-set-of-data).
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

from dagster import (
    ConfigurableIOManager,
    DagsterInvariantViolationError,
    InputContext,
    OutputContext,
    ResourceDependency,
)

from pipeline.core.atomic import write_bytes_atomic
from pipeline.core.records import KEPT_FILE, StagedRows
from resources.data_root import DataRoot

STAGED = "__staged__"  # a descriptor that points at a stage folder
DATACLASS = "__dataclass__"
RUN_ID_PLACEHOLDER = "__EPHEMERAL_RUN_ID"  # the run id Dagster gives an upstream output of no run of this lineage


def _name(context: InputContext | OutputContext) -> str:
    return "__".join(context.asset_key.path) if context.has_asset_key else context.name


class StageIOManager(ConfigurableIOManager):
    data_root: ResourceDependency[DataRoot]

    def descriptor_path(self, run_id: str, name: str) -> Path:
        return self.data_root.run_dir(run_id) / f"{name}.json"

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        name = _name(context)
        if isinstance(obj, StagedRows):
            expected = self.data_root.stage_dir(name, context.run_id)
            if Path(obj.folder).resolve() != expected.resolve():
                raise ValueError(f"{context.asset_key.to_user_string()} wrote its rows to {obj.folder}, not {expected}")
            payload = {STAGED: str(expected)}  # the stage wrote its folder itself, chunk by chunk
        elif dataclasses.is_dataclass(obj):
            payload = {DATACLASS: f"{type(obj).__module__}:{type(obj).__qualname__}", **dataclasses.asdict(obj)}
        else:
            payload = obj
        data = json.dumps(payload, ensure_ascii=False, indent=1, default=str).encode()
        write_bytes_atomic(self.descriptor_path(context.run_id, name), data)
        write_bytes_atomic(self.data_root.stages_dir / f"{name}.json", data)

    def load_input(self, context: InputContext) -> Any:
        upstream = context.upstream_output
        name = _name(upstream)
        try:
            source_run = upstream.run_id  # this run, or the parent run of a re-execution
        except DagsterInvariantViolationError:
            source_run = None
        if source_run and source_run != RUN_ID_PLACEHOLDER:
            path = self.descriptor_path(source_run, name)
            if path.is_file():
                return decode(json.loads(path.read_text()), expected_type(context))
            if source_run == context.step_context.run_id:
                raise FileNotFoundError(
                    f"{upstream.asset_key.to_user_string()} of this run is not on disk ({path} missing)"
                )
        # not built in this run (Dagster hands a placeholder run id): the latest, pinned
        return decode(self._pinned(context, name, upstream.asset_key), expected_type(context))

    def _pinned(self, context: InputContext, name: str, asset_key) -> Any:
        """The latest materialization of an asset this run did not produce, as this run first read it."""
        here = self.descriptor_path(context.step_context.run_id, name)
        if here.is_file():
            return json.loads(here.read_text())
        event = context.instance.get_latest_materialization_event(asset_key)
        # an instance that never materialized it (a new DAGSTER_HOME over an old data root): the latest on disk
        path = (
            self.descriptor_path(event.run_id, name)
            if event is not None
            else self.data_root.stages_dir / f"{name}.json"
        )
        if not path.is_file():
            what = (
                f"run {event.run_id}'s output {path} is gone" if event is not None else "it has not been materialized"
            )
            raise FileNotFoundError(f"{asset_key.to_user_string()} cannot be read: {what}; materialize it again")
        data = path.read_bytes()
        write_bytes_atomic(here, data)  # pinned: the rest of this run reads the same one
        return json.loads(data)


def expected_type(context: InputContext) -> type | None:
    """The Python type the reading asset declares for this input, where Dagster knows it."""
    return getattr(getattr(context, "dagster_type", None), "typing_type", None)


def decode(payload: Any, expected: type | None = None) -> Any:
    """A descriptor as the value it describes. A plain dict where the reader declares a dataclass (a
    descriptor written before that value had its class) becomes that class, by its fields."""
    if isinstance(payload, dict) and STAGED in payload:
        folder = Path(payload[STAGED])
        if not (folder / KEPT_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no {KEPT_FILE}: materialize this stage again")
        return StagedRows.load(folder)
    if isinstance(payload, dict) and DATACLASS in payload:
        import importlib

        payload = dict(payload)
        module, _, name = payload.pop(DATACLASS).partition(":")
        cls = getattr(importlib.import_module(module), name)
        return cls(**payload)
    if isinstance(payload, dict) and isinstance(expected, type) and dataclasses.is_dataclass(expected):
        if hasattr(expected, "from_plain"):  # a class that knows its older, flat shape
            return expected.from_plain(payload)
        fields = {f.name for f in dataclasses.fields(expected)}
        return expected(**{k: v for k, v in payload.items() if k in fields})
    return payload
