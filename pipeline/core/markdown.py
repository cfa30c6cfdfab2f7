"""The one Markdown table builder of the project (Dagster metadata, MLflow descriptions, summaries):
every cell escaped the same way, so a ``|`` or a line break in a value never breaks a table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any, width: int | None = None) -> str:
    """A value as one table cell: None and NaN empty, line breaks as spaces, ``|`` escaped, text
    longer than ``width`` clipped with an ellipsis."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return ""
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    text = str(value).replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], width: int | None = None) -> str:
    """A Markdown table: ``header`` and one line a row, each value through :func:`cell`."""
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v, width) for v in row) + " |" for row in rows]
    return "\n".join(lines)
