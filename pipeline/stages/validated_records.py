"""Stage 2 (asset ``validated_records``): a Great Expectations suite over the ingested rows.

The suite (GX Core 1.x, pandas engine) checks, for ``instruction``, ``input`` and ``output``:
the column exists; ``instruction`` and ``output`` are not null and not blank after trimming;
lengths lie within configured bounds; no control characters other than newline and tab; valid
Unicode (no lone surrogates, which ingestion turns into U+FFFD, no U+FFFD replacement
characters left by an earlier bad decode, no noncharacters U+FFFE / U+FFFF).

GX's ``COMPLETE`` result format lists the failing row indexes of each expectation; each failing
row is rejected with every expectation it failed. The regular expressions are written without
``\\s`` or ``\\u`` escapes so that pandas runs them in pyarrow's RE2 engine, not row by row.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.chunks import CHUNK_ROWS
from pipeline.core.pool import map_batches, read_batch, workers_for
from pipeline.core.records import (
    FIELDS,
    StagedRows,
    StageResult,
    empty_records,
    in_memory,
    records_as_rejects,
    stage_output,
)

STAGE = "validate"

# Characters Python's str.strip() removes, plus zero-width space and BOM (invisible "blank").
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK_REGEX = f"[^{WHITESPACE}]"
# C0 controls except tab (0x09) and newline (0x0a), DEL, and C1 controls.
CONTROL_CHARS_REGEX = "[\x00-\x08\x0b-\x1f\x7f-\x9f]"
INVALID_UNICODE_REGEX = "[\ufffd\ufffe\uffff]"
# what GX checks on every row of a column; the rest on its non-null rows (``Suite``)
PRESENCE = ("expect_column_to_exist", "expect_column_values_to_not_be_null")


class Bounds(BaseModel):
    """Length bounds in characters, per field: the ``validated_records`` asset's settings, declared once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_instruction_chars: int = Field(1, ge=0, description="Shortest instruction kept, in characters")
    max_instruction_chars: int = Field(4_000, gt=0, description="Longest instruction kept, in characters")
    max_input_chars: int = Field(16_000, gt=0, description="Longest input kept, in characters (the input may be empty)")
    min_output_chars: int = Field(1, ge=0, description="Shortest answer kept, in characters")
    max_output_chars: int = Field(16_000, gt=0, description="Longest answer kept, in characters")


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str | None
    description: str
    success: bool
    unexpected_count: int
    examples: list[str]


def _describe(kind: str, column: str, kwargs: dict[str, Any]) -> str:
    if kind == "expect_column_to_exist":
        return "column exists"
    if kind == "expect_column_values_to_not_be_null":
        return "not missing (null)"
    if kind == "expect_column_values_to_match_regex":
        return "not blank after trimming"
    if kind == "expect_column_value_lengths_to_be_between":
        return f"length between {kwargs.get('min_value')} and {kwargs.get('max_value')} characters"
    if kind == "expect_column_values_to_not_match_regex":
        if kwargs.get("regex") == CONTROL_CHARS_REGEX:
            return "no control characters other than newline and tab"
        return "valid Unicode (no lone surrogate, U+FFFD or noncharacter)"
    return kind


def build_expectations(bounds: Bounds, columns: tuple[str, ...] = FIELDS) -> list[Any]:
    """The suite, column by column (each column's expectations together)."""
    import great_expectations.expectations as gxe

    lengths = {
        "instruction": (bounds.min_instruction_chars, bounds.max_instruction_chars),
        "input": (0, bounds.max_input_chars),
        "output": (bounds.min_output_chars, bounds.max_output_chars),
    }
    suite: list[Any] = []
    for c in columns:
        suite.append(gxe.ExpectColumnToExist(column=c))
        if c in ("instruction", "output"):
            suite.append(gxe.ExpectColumnValuesToNotBeNull(column=c))
            suite.append(gxe.ExpectColumnValuesToMatchRegex(column=c, regex=NOT_BLANK_REGEX))
        lo, hi = lengths[c]
        suite.append(gxe.ExpectColumnValueLengthsToBeBetween(column=c, min_value=lo, max_value=hi))
        suite.append(gxe.ExpectColumnValuesToNotMatchRegex(column=c, regex=CONTROL_CHARS_REGEX))
        suite.append(gxe.ExpectColumnValuesToNotMatchRegex(column=c, regex=INVALID_UNICODE_REGEX))
    return suite


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """GX fingerprints the whole frame only to label the batch (it already skips this for large
    frames); on arrow-backed strings that costs more than the validation itself, so we lower its
    threshold for the call. Our own data fingerprints are recorded with every artifact instead."""
    from great_expectations.execution_engine import pandas_execution_engine as engine

    old = engine.HASH_THRESHOLD
    engine.HASH_THRESHOLD = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        engine.HASH_THRESHOLD = old


class Suite:
    """The suite, built once (a GX ephemeral context, one validation definition per column) and
    run on any number of frames: the streamed stage runs it once per chunk.

    GX runs once per column on a one-column frame: its pandas engine copies the whole frame
    for each expectation's null filter, so narrow frames make it several times faster on
    large inputs. For the same reason each column runs as two validations: whether it is there
    and not null, on every row; then the checks of its values (blank, lengths, characters) on its
    non-null rows alone, which GX would skip anyway (they keep their row labels, so GX names the
    same rows). Those filters then select every row and copy nothing: a chunk with one null used
    to cost a copy of the column per check. The expectations, their order and results are the
    same.
    """

    def __init__(self, bounds: Bounds, examples: int = 3):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.examples = examples
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = ctx.data_sources.add_pandas("medtune")
        self.definitions = []  # (column, on the non-null rows only, definition)
        for column in FIELDS:
            expectations = build_expectations(bounds, (column,))
            for values_only in (False, True):
                name = f"{column}_values" if values_only else column
                batch_def = source.add_dataframe_asset(f"records_{name}").add_batch_definition_whole_dataframe("all")
                suite = ctx.suites.add(gx.ExpectationSuite(name=f"alpaca_records_{name}"))
                for expectation in expectations:
                    if (expectation.expectation_type not in PRESENCE) == values_only:
                        suite.add_expectation(expectation)
                definition = ctx.validation_definitions.add(
                    gx.ValidationDefinition(name=f"validate_{name}", data=batch_def, suite=suite)
                )
                self.definitions.append((column, values_only, definition))

    def run(self, df: pd.DataFrame) -> tuple[list[ExpectationOutcome], dict[int, list[str]]]:
        """Each expectation's outcome and ``{row position: [reasons]}`` for one frame."""
        frame = df.reset_index(drop=True)
        examples = self.examples
        outcomes: list[ExpectationOutcome] = []
        reasons: dict[int, list[str]] = {}
        for column, values_only, definition in self.definitions:
            part = frame[[column]] if column in frame.columns else frame.iloc[:, :0]
            if values_only:
                present = part[column].notna()
                part = part if present.all() else part[present]  # the row labels kept
            with _quiet_gx():
                result = definition.run(
                    batch_parameters={"dataframe": part},
                    result_format={
                        "result_format": "COMPLETE",
                        "partial_unexpected_count": examples,
                        "return_unexpected_index_query": False,
                    },
                )
            for r in result.results:
                cfg = r.expectation_config
                kind = cfg.type
                if kind == "expect_column_to_exist" and not r.success:
                    raise ValueError(f"required column {column!r} is missing from the records")
                info = r.exception_info or {}
                if info.get("raised_exception"):
                    raise RuntimeError(
                        f"expectation {kind} on {column!r} could not run: {info.get('exception_message')}"
                    )
                res = r.result or {}
                description = _describe(kind, column, cfg.kwargs)
                for idx in res.get("unexpected_index_list") or []:
                    reasons.setdefault(int(idx), []).append(f"{column}: {description} [{kind}]")
                shown = [_short(v) for v in (res.get("partial_unexpected_list") or [])[:examples]]
                outcomes.append(
                    ExpectationOutcome(
                        kind, column, description, bool(r.success), int(res.get("unexpected_count") or 0), shown
                    )
                )
        return outcomes, reasons


_SUITES: dict[tuple[Bounds, int], Suite] = {}


def suite_for(bounds: Bounds, examples: int = 3) -> Suite:
    """The suite for these bounds, built once per process (about 0.2 s each time otherwise): each
    validation, each chunk and each worker's batch reuses it."""
    key = (bounds, examples)
    if key not in _SUITES:
        _SUITES[key] = Suite(bounds, examples)
    return _SUITES[key]


def run_suite(
    df: pd.DataFrame, bounds: Bounds, examples: int = 3
) -> tuple[list[ExpectationOutcome], dict[int, list[str]]]:
    """Run the suite once on ``df``: each expectation's outcome and ``{row position: [reasons]}``."""
    return suite_for(bounds, examples).run(df)


def merge_outcomes(
    total: list[ExpectationOutcome] | None, part: list[ExpectationOutcome], examples: int = 3
) -> list[ExpectationOutcome]:
    """Outcomes of consecutive chunks as the outcome of the whole: counts added, examples in
    row order, a pass only where every chunk passed."""
    if total is None:
        return [ExpectationOutcome(**o.__dict__) for o in part]
    for t, p in zip(total, part, strict=True):
        t.success = t.success and p.success
        t.unexpected_count += p.unexpected_count
        t.examples = (t.examples + p.examples)[:examples]
    return total


def _short(v: Any, width: int = 40) -> str:
    s = repr(v) if not isinstance(v, str) else repr(v)[1:-1]
    return s if len(s) <= width else s[: width - 1] + "…"


def _apply(frame: pd.DataFrame, reasons: dict[int, list[str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    bad = sorted(reasons)
    mask = np.zeros(len(frame), dtype=bool)
    mask[bad] = True
    rejected = records_as_rejects(frame.iloc[bad], STAGE, ["; ".join(reasons[i]) for i in bad])
    return frame[~mask].reset_index(drop=True), rejected


def _stats(rows_in: int, rows_kept: int, rows_rejected: int, outcomes: list[ExpectationOutcome]) -> dict:
    return {
        "rows_in": rows_in,
        "rows_kept": rows_kept,
        "rows_rejected": rows_rejected,
        "expectations": [o.__dict__ for o in outcomes],
        "report_markdown": report_markdown(outcomes),
    }


def validate_records(df: pd.DataFrame, bounds: Bounds | None = None) -> StageResult:
    """Split ingested rows into those that pass the suite and those that fail (with reasons), in
    memory: the asset's own :func:`validate_to` over a temporary folder (one code path)."""
    with in_memory(validate_to, df, bounds=bounds) as result:
        return result


def validate_to(
    rows: StagedRows,
    folder: str | os.PathLike,
    bounds: Bounds | None = None,
    chunk_rows: int = CHUNK_ROWS,
    workers: int | None = None,
    log=None,
) -> StagedRows:
    """:func:`validate_records`, streamed: the suite runs on each chunk of ``rows`` and the
    results add up to one report; kept and rejected rows go to ``folder`` chunk by chunk. On
    2,000,000 rows or more the suite runs in one worker process per core (``pipeline.core.pool``),
    which send back only the reasons; ``workers`` sets how many. ``log``: a progress line every few
    seconds (rows checked, rows/s, time left)."""
    from pipeline.core.progress import Progress

    bounds = bounds or Bounds()
    progress = Progress(log, "validated_records", rows.n_kept, every=5.0)
    n_workers = workers_for(rows.n_kept, workers)
    suite = suite_for(bounds) if n_workers == 1 else None
    total: list[ExpectationOutcome] | None = None
    rows_in = 0
    if n_workers == 1:
        results = ((chunk, *suite.run(chunk)) for chunk in rows.iter_kept(chunk_rows))
    else:
        results = (
            (read_batch(rows.kept_path, i), *done)
            for i, done in enumerate(map_batches(rows.kept_path, _run_batch, (bounds.model_dump(),), n_workers))
        )
    with stage_output(folder, empty_records(), chunk_rows) as out:
        for chunk, outcomes, reasons in results:
            kept, rejected = _apply(chunk, reasons)
            out.kept.write(kept)
            out.rejected.write(rejected)
            total = merge_outcomes(total, outcomes)
            rows_in += len(chunk)
            progress(rows_in)
        if total is None:  # no rows: the report still lists every expectation
            total, _ = (suite or suite_for(bounds)).run(empty_records())
        out.stats = _stats(rows_in, out.kept.rows, out.rejected.rows, total)
        out.stats["workers"] = n_workers
    return StagedRows(str(folder), out.stats)


def _run_batch(path: str, index: int, bounds: dict) -> tuple[list[ExpectationOutcome], dict[int, list[str]]]:
    """In a worker: the suite (built once per process) on batch ``index`` of ``path``."""
    return suite_for(Bounds(**bounds)).run(read_batch(path, index))


def report_markdown(outcomes: list[ExpectationOutcome]) -> str:
    from pipeline.core.markdown import table

    return table(
        ["expectation", "column", "rule", "result", "unexpected", "examples"],
        [
            (
                o.expectation,
                o.column,
                o.description,
                "✅ pass" if o.success else "❌ fail",
                o.unexpected_count,
                ", ".join(f"`{e}`" for e in o.examples),
            )
            for o in outcomes
        ],
    )
