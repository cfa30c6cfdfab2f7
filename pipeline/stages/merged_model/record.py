"""The export's record (written last into a merged folder) and the stage's error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

EXPORT_RECORD = "medtune_export.json"


class ExportError(RuntimeError):
    """An adapter that cannot be merged, or a merge that does not match its adapter."""


def read_export_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / EXPORT_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
