"""Stage ``rejected_records``: every row the data stages left out, in one table, and its summary.

The rows of the three data stages are concatenated in stage order, each stage's rows in source
order, with file, line, stage and reason (the layout of ``pipeline.core.records.rejects_frame``).
"""

from __future__ import annotations

import pandas as pd

from pipeline.core.records import rejects_frame


def collect_rejected(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The stages' rejected rows, in stage order, in the rejects layout (an empty table if none)."""
    return pd.concat([rejects_frame(), *parts], ignore_index=True).astype(rejects_frame().dtypes.to_dict())


def reasons_markdown(rejected: pd.DataFrame, limit: int = 15) -> str:
    """Rows per stage and kind of reason (the text before a reason's details), most frequent first."""
    if rejected.empty:
        return "_nothing rejected_"
    # group reasons by their general form: the text before the first ':' or '(' of each part
    kinds = rejected["reason"].str.replace(r" \(.*$| of .*:\d+.*$", "", regex=True).str.slice(0, 90)
    table = (
        pd.DataFrame({"stage": rejected["stage"], "reason": kinds})
        .value_counts()
        .reset_index(name="rows")
        .head(limit)
    )
    lines = ["| stage | reason | rows |", "|---|---|---|"]
    for stage, reason, rows in table.itertuples(index=False, name=None):
        lines.append(f"| {stage} | {str(reason).replace('|', '/')} | {rows} |")
    return "\n".join(lines)
