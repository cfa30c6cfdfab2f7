"""Column layout shared by the data stages, and the rejected-row records they emit.

Every stage returns a :class:`StageResult`: the rows it kept and the rows it rejected.
A rejected row always names its ``source_file``, ``source_line``, the ``stage`` that
rejected it, a human-readable ``reason`` and the original row as text (``raw``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.atomic import atomic_dir
from pipeline.core.chunks import CHUNK_ROWS, ChunkWriter, iter_chunks, read_table

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
    from pipeline.core.markdown import table

    cols = columns or list(df.columns)
    return table(cols, df[cols].head(n).itertuples(index=False, name=None), width)


# ----------------------------------------------------------------------------- staged rows
# Between the data assets rows travel as files, a chunk at a time (``pipeline.core.chunks``):
# each stage writes ``kept.arrow``, ``rejected.arrow`` and ``stats.json`` into its folder under
# ``processed/stages/`` and hands on a :class:`StagedRows` that points at them.

KEPT_FILE = "kept.arrow"
REJECTED_FILE = "rejected.arrow"
STATS_FILE = "stats.json"


@dataclass
class StagedRows:
    """A data stage's output on disk: kept rows, rejected rows (both read a chunk at a time) and
    the stage's figures (``rows_kept`` and ``rows_rejected`` among them)."""

    folder: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_path(self) -> Path:
        return Path(self.folder) / KEPT_FILE

    @property
    def rejected_path(self) -> Path:
        return Path(self.folder) / REJECTED_FILE

    @property
    def n_kept(self) -> int:
        return int(self.stats["rows_kept"])

    @property
    def n_rejected(self) -> int:
        return int(self.stats["rows_rejected"])

    def iter_kept(self, rows: int | None = None, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        return iter_chunks(self.kept_path, rows or CHUNK_ROWS, columns)

    def iter_rejected(self, rows: int | None = None) -> Iterator[pd.DataFrame]:
        return iter_chunks(self.rejected_path, rows or CHUNK_ROWS)

    def read_kept(self) -> pd.DataFrame:
        return read_table(self.kept_path)

    def read_rejected(self) -> pd.DataFrame:
        return read_table(self.rejected_path).astype(REJECT_DTYPES)

    @classmethod
    def load(cls, folder) -> StagedRows:
        folder = Path(folder)
        if not (folder / KEPT_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no {KEPT_FILE}: materialize this stage again")
        return cls(str(folder), json.loads((folder / STATS_FILE).read_text()))


class StageSink:
    """The open writers of a stage's output folder (see :func:`stage_output`)."""

    def __init__(self, tmp: Path, kept_empty: pd.DataFrame, chunk_rows: int):
        self.tmp = tmp
        self.kept = ChunkWriter(tmp / KEPT_FILE, "arrow", empty=kept_empty, chunk_rows=chunk_rows)
        self.rejected = ChunkWriter(tmp / REJECTED_FILE, "arrow", empty=rejects_frame(), chunk_rows=chunk_rows)
        self.stats: dict[str, Any] = {}


@contextlib.contextmanager
def stage_output(folder, kept_empty: pd.DataFrame, chunk_rows: int) -> Iterator[StageSink]:
    """A stage writes its kept and rejected chunks and sets ``stats``; on success the folder
    replaces the previous one whole, on failure the previous one stays as it was."""
    # the writers close inside the folder before it is renamed into place
    with atomic_dir(folder) as tmp:
        sink = StageSink(tmp, kept_empty, chunk_rows)
        try:
            yield sink
            sink.kept.close()
            sink.rejected.close()
            (tmp / STATS_FILE).write_text(json.dumps(sink.stats, ensure_ascii=False, indent=1, default=str))
        except BaseException as exc:
            raised = [sink.kept._abort(type(exc), exc, None), sink.rejected._abort(type(exc), exc, None)]
            named = [r for r in raised if r is not None and r is not exc]
            if named:
                raise named[0] from exc  # the write error, naming the file
            raise


@contextlib.contextmanager
def in_memory(stage, *inputs: pd.DataFrame, **kwargs) -> Iterator[StageResult]:
    """A streamed stage run on DataFrames, its output read back: ``stage(*staged_inputs, folder,
    **kwargs)`` in a temporary folder. The in-memory ``ingest`` / ``validate_records`` /
    ``deduplicate`` are this, so tests and tools run exactly the code the assets run."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="medtune-stage-") as tmp:
        staged = [staged_from_frame(df, Path(tmp) / f"input-{i}") for i, df in enumerate(inputs)]
        out = stage(*staged, Path(tmp) / "output", **kwargs)
        yield StageResult(kept=out.read_kept(), rejected=out.read_rejected(), stats=out.stats)


def staged_from_frame(df: pd.DataFrame, folder, chunk_rows: int = CHUNK_ROWS) -> StagedRows:
    """Rows held in a DataFrame as a stage's output folder (kept rows only), for a stage to read."""
    frame = df.reset_index(drop=True)
    with stage_output(folder, frame.iloc[:0], chunk_rows) as out:
        out.kept.write(frame)
        out.stats = {"rows_kept": len(frame), "rows_rejected": 0}
    return StagedRows(str(folder), out.stats)
