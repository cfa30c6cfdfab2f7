"""Column layout shared by the data stages, and the rejected-row records they emit.

Every stage returns a :class:`StageResult`: the rows it kept and the rows it rejected.
A rejected row always names its ``source_file``, ``source_line``, the ``stage`` that
rejected it, a human-readable ``reason`` and the original row as text (``raw``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

FIELDS = ("instruction", "input", "output")
REJECT_COLUMNS = ("source_file", "source_line", "source_index", "stage", "reason", "raw")
REJECT_DTYPES = {
    "source_file": "str",
    "source_line": "Int64",
    "source_index": "Int64",
    "stage": "str",
    "reason": "str",
    "raw": "str",
}

# A rejected row keeps at most this many characters of its original text.
MAX_RAW_CHARS = 1_000_000


def clip_raw(text: str) -> str:
    if len(text) <= MAX_RAW_CHARS:
        return text
    return text[:MAX_RAW_CHARS] + f"…[clipped: {len(text):,} characters in all]"


def empty_records() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "source_file": pd.Series([], dtype="str"),
            "source_line": pd.Series([], dtype="int64"),
            "source_index": pd.Series([], dtype="int64"),
            "instruction": pd.Series([], dtype="str"),
            "input": pd.Series([], dtype="str"),
            "output": pd.Series([], dtype="str"),
        }
    )


def rejects_frame(rows: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """A rejected-rows table with the fixed column layout (``source_line`` may be missing)."""
    rows = rows or []
    df = pd.DataFrame(rows, columns=list(REJECT_COLUMNS))
    return df.astype(REJECT_DTYPES)


def records_as_rejects(records: pd.DataFrame, stage: str, reasons: list[str] | pd.Series) -> pd.DataFrame:
    """Turn kept-format rows into rejected rows; ``raw`` is the row's fields as JSON."""
    fields = records[list(FIELDS)]
    raw = [
        clip_raw(json.dumps(dict(zip(FIELDS, values)), ensure_ascii=False))
        for values in fields.itertuples(index=False, name=None)
    ]
    out = pd.DataFrame(
        {
            "source_file": records["source_file"].to_numpy(),
            "source_line": records["source_line"].to_numpy(),
            "source_index": records["source_index"].to_numpy(),
            "stage": stage,
            "reason": list(reasons),
            "raw": raw,
        }
    )
    return out.astype(REJECT_DTYPES)


@dataclass
class StageResult:
    """What a data stage kept, what it rejected, and figures for the asset's metadata."""

    kept: pd.DataFrame
    rejected: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    @property
    def n_rejected(self) -> int:
        return len(self.rejected)


def preview_markdown(df: pd.DataFrame, columns: list[str] | None = None, n: int = 5, width: int = 60) -> str:
    """A short Markdown table of the first rows, long text clipped, for Dagster metadata."""
    if df.empty:
        return "_no rows_"
    cols = columns or list(df.columns)
    head = df[cols].head(n)

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA:
            return ""
        s = str(v).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
        return s if len(s) <= width else s[: width - 1] + "…"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)
