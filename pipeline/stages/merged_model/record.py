"""The export's record (written last into a merged folder), what the stage hands on, and its error."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPORT_RECORD = "medtune_export.json"


@dataclass(frozen=True)
class MergedModel:
    """What ``merged_model`` hands on: the merged folder (``None`` where the method cannot be merged:
    then ``reason``, and the adapter and base to serve together) and the merge check's verdict."""

    merged_id: str
    adapter_id: str
    method: str
    mergeable: bool
    path: str | None
    verification: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    reason: str | None = None
    adapter_path: str | None = None
    base_model_path: str | None = None


class ExportError(RuntimeError):
    """An adapter that cannot be merged, or a merge that does not match its adapter."""


def read_export_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / EXPORT_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
