"""Stage ``rejected_records``: every row the data stages left out, in one table, and its summary.

The rows of the three data stages are concatenated in stage order, each stage's rows in source
order, with file, line, stage and reason (the layout of ``pipeline.core.records.rejects_frame``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from pipeline.core.chunks import CHUNK_ROWS, ChunkWriter
from pipeline.core.records import rejects_frame


@dataclass(frozen=True)
class RejectedRecords:
    """What ``rejected_records`` hands on: the run's rejected rows (Parquet) and how many each stage left out."""

    path: str
    rows: int
    by_stage: dict[str, int] = field(default_factory=dict)


def collect_rejected(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The stages' rejected rows, in stage order, in the rejects layout (an empty table if none)."""
    return pd.concat([rejects_frame(), *parts], ignore_index=True).astype(rejects_frame().dtypes.to_dict())


def write_rejected(stages, path, chunk_rows: int = CHUNK_ROWS, log=None) -> dict:
    """:func:`collect_rejected` of the stages (:class:`~pipeline.core.records.StagedRows`), written
    chunk by chunk to ``path``: byte-identical to writing the collected table at once. Returns the
    rows per stage and the most frequent reasons (``reasons_markdown``'s table, over every row)."""
    from pipeline.core.progress import Progress

    by_stage: dict[str, int] = {}
    kinds: Counter[tuple[str, str]] = Counter()
    progress = Progress(log, "rejected_records", sum(s.n_rejected for s in stages), every=5.0)
    with ChunkWriter(path, "parquet", empty=rejects_frame()) as out:
        for staged in stages:
            for chunk in staged.iter_rejected(chunk_rows):
                chunk = collect_rejected([chunk])
                out.write(chunk)
                for stage, n in chunk["stage"].value_counts().items():
                    by_stage[stage] = by_stage.get(stage, 0) + int(n)
                kinds.update(zip(chunk["stage"], _kinds(chunk["reason"])))
                progress(sum(by_stage.values()))
    return {"rows": sum(by_stage.values()), "by_stage": by_stage, "reasons": _kinds_markdown(kinds)}


def _kinds(reasons: pd.Series) -> pd.Series:
    """A reason's general form: the text before its details (a row's position, the values)."""
    return reasons.str.replace(r" \(.*$| of .*:\d+.*$", "", regex=True).str.slice(0, 90)


def _kinds_markdown(kinds: Counter, limit: int = 15) -> str:
    if not kinds:
        return "_nothing rejected_"
    from pipeline.core.markdown import table

    return table(
        ["stage", "reason", "rows"],
        [(stage, reason, rows) for (stage, reason), rows in sorted(kinds.items(), key=lambda kv: -kv[1])[:limit]],
    )


def reasons_markdown(rejected: pd.DataFrame, limit: int = 15) -> str:
    """Rows per stage and kind of reason (the text before a reason's details), most frequent first."""
    if rejected.empty:
        return "_nothing rejected_"
    return _kinds_markdown(Counter(zip(rejected["stage"], _kinds(rejected["reason"]))), limit)
