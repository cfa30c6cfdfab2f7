"""One raw file's rows (``ingest_file``): decoded, parsed, split into usable rows (an Arrow table)
and rejected rows with their reasons, plus the file's summary for the ``raw_records`` metadata."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.records import FIELDS, clip_raw
from pipeline.stages.raw_records.decoding import FileRejected, decode_lines
from pipeline.stages.raw_records.json_recovery import parse_text
from pipeline.stages.raw_records.json_values import DUPLICATE_KEYS, Parsed

STAGE = "ingest"

_EXACT_KEYS = frozenset(FIELDS)
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class FileSummary:
    source_file: str
    encoding: str = ""
    format: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    rows_rejected: int = 0
    blank_lines: int = 0
    notes: list[str] = field(default_factory=list)
    error: str = ""


_TYPE_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "an object",
    str: "a string",
}


def _type_name(v: Any) -> str:
    if isinstance(v, float) and v != v:
        return "NaN"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "Infinity"
    return _TYPE_NAMES.get(type(v), type(v).__name__)


def _fields_of(obj: dict) -> tuple[Any, Any, Any] | str:
    """The three fields of one JSON object, or a reason to reject it."""
    if DUPLICATE_KEYS in obj:
        dups = [k for k in obj[DUPLICATE_KEYS] if k.strip().lower() in FIELDS] or obj[DUPLICATE_KEYS]
        return (
            f"key {dups[0]!r} given twice in one record with different values (a JSON parser would silently "
            "keep the last)"
        )
    if len(obj) <= 3 and all(k in ("instruction", "input", "output") for k in obj):
        instruction = obj.get("instruction")
        inp = obj.get("input", "")
        output = obj.get("output")
        explicit = obj
    else:
        explicit = {}
        for key, value in obj.items():
            norm = key.strip().lower()
            if norm not in FIELDS:
                continue
            if norm in explicit and explicit[norm] != value:
                return f"keys {norm!r} given twice with different values (key spellings differ)"
            explicit[norm] = value
        instruction = explicit.get("instruction")
        inp = explicit.get("input", "")
        output = explicit.get("output")
    problems = []
    for name, value in (("instruction", instruction), ("input", inp), ("output", output)):
        if value is None:
            if name in explicit:
                problems.append(f"field {name!r} is null")
        elif type(value) is not str:
            problems.append(f"field {name!r} is {_type_name(value)}, expected a string")
    if problems:
        return "; ".join(problems)
    return instruction, inp, output


def _to_arrow(values: list[Any], name: str, notes: Counter) -> pa.Array:
    try:
        return pa.array(values, type=pa.large_string())
    except (UnicodeEncodeError, pa.ArrowException):
        fixed = [v if v is None else _SURROGATE.sub("\ufffd", v) for v in values]
        notes[f"lone surrogates in {name!r} replaced by U+FFFD (validation rejects them)"] += sum(
            1 for a, b in zip(values, fixed) if a != b
        )
        return pa.array(fixed, type=pa.large_string())


def _normalise_newlines(arr: pa.Array) -> pa.Array:
    data = arr.buffers()[2]  # the strings' bytes back to back: one search, not one a string
    if data is None or data.to_pybytes().find(b"\r") < 0:
        return arr
    return pc.replace_substring(pc.replace_substring(arr, "\r\n", "\n"), "\r", "\n")


def _split_fields(
    parsed: Parsed, rel: str, rejected: list[dict], extra: Counter | None = None
) -> tuple[list, list, list, list, list]:
    """Columns of the rows whose fields are usable; the others go to ``rejected`` with a reason.

    The common case (objects with exactly the three keys, all strings) runs as list
    comprehensions; only the rows that fail it go through the row-by-row path.
    """
    values, lines, indexes = parsed.values, parsed.lines, parsed.indexes
    exact = _EXACT_KEYS
    ins = [v.get("instruction") if type(v) is dict else None for v in values]
    inp = [v.get("input", "") if type(v) is dict else None for v in values]
    out = [v.get("output") if type(v) is dict else None for v in values]
    fast = [
        type(a) is str and type(b) is str and type(c) is str and v.keys() <= exact
        for a, b, c, v in zip(ins, inp, out, values)
    ]
    if all(fast):
        return lines, indexes, ins, inp, out
    cols: tuple[list, list, list, list, list] = ([], [], [], [], [])
    l_col, x_col, i_col, n_col, o_col = cols
    counted = extra is not None  # a file read in blocks counts its extra fields over all of them
    extra = extra if counted else Counter()
    for k, ok in enumerate(fast):
        if ok:
            fields = (ins[k], inp[k], out[k])
        else:
            value = values[k]
            if type(value) is dict:
                extra.update(key for key in value if key != DUPLICATE_KEYS and key.strip().lower() not in FIELDS)
            fields = (
                _fields_of(value) if type(value) is dict else f"record is {_type_name(value)}, expected a JSON object"
            )
            if type(fields) is str:
                if parsed.source_lines is not None:
                    raw = parsed.source_lines[lines[k] - 1 - parsed.line_base]
                else:
                    raw = json.dumps(value, ensure_ascii=False, default=str, allow_nan=True)
                rejected.append(
                    {
                        "source_file": rel,
                        "source_line": lines[k],
                        "source_index": indexes[k],
                        "stage": STAGE,
                        "reason": fields,
                        "raw": clip_raw(raw),
                    }
                )
                continue
        l_col.append(lines[k])
        x_col.append(indexes[k])
        i_col.append(fields[0])
        n_col.append(fields[1])
        o_col.append(fields[2])
    if extra and not counted:
        parsed.notes.append(extra_fields_note(extra))
    return cols


def extra_fields_note(extra: Counter) -> str:
    shown = ", ".join(f"{key!r} ({n})" for key, n in extra.most_common(8))
    return f"fields other than instruction/input/output ignored: {shown}"


@dataclass
class FileResult:
    """One file read: its kept rows as an Arrow table (or None), its rejected rows, a summary."""

    table: pa.Table | None
    rejected: list[dict]
    summary: FileSummary
    notes: Counter = field(default_factory=Counter)


def ingest_file(path: Path, rel: str) -> FileResult:
    """Read one file. Never raises for bad input: problems become rejected rows."""
    summary = FileSummary(source_file=rel)
    rejected: list[dict] = []
    try:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FileRejected(f"cannot read file: {exc.strerror or exc}") from None
        text, summary.encoding, bad = decode_lines(data)
        del data
        parsed = parse_text(text, bad)
    except FileRejected as exc:
        summary.error = str(exc)
        summary.rows_read = summary.rows_rejected = 1
        rejected.append(
            {
                "source_file": rel,
                "source_line": None,
                "source_index": None,
                "stage": STAGE,
                "reason": f"file rejected: {exc}",
                "raw": file_preview(path),
            }
        )
        return FileResult(None, rejected, summary)
    summary.format = parsed.format
    summary.blank_lines = parsed.blank_lines
    del text
    result = rows_of(parsed, rel)
    summary.notes = sorted(set(parsed.notes))
    summary.rows_kept, summary.rows_rejected = result.summary.rows_kept, result.summary.rows_rejected
    summary.rows_read = summary.rows_kept + summary.rows_rejected
    result.summary = summary
    return result


def rows_of(parsed: Parsed, rel: str, extra: Counter | None = None) -> FileResult:
    """Parsed values as rows: the usable ones as an Arrow table, the others rejected with their
    reason (in the order of the file). Its summary holds the row counts only."""
    rejected: list[dict] = []
    for line, index, reason, raw in parsed.errors:
        rejected.append(
            {
                "source_file": rel,
                "source_line": line,
                "source_index": index,
                "stage": STAGE,
                "reason": reason,
                "raw": clip_raw(raw),
            }
        )
    lines_col, index_col, ins_col, inp_col, out_col = _split_fields(parsed, rel, rejected, extra)
    rejected.sort(key=lambda r: (r["source_index"], r["source_line"]))
    summary = FileSummary(source_file=rel, rows_kept=len(lines_col), rows_rejected=len(rejected))
    notes: Counter[str] = Counter()
    table = None
    if lines_col:
        n = len(lines_col)
        arrays = {
            "source_file": pa.array([rel] * n, pa.large_string()),
            "source_line": pa.array(lines_col, pa.int64()),
            "source_index": pa.array(index_col, pa.int64()),
        }
        for name, col in (("instruction", ins_col), ("input", inp_col), ("output", out_col)):
            arr = _to_arrow(col, name, notes)
            arrays[name] = _normalise_newlines(arr)
        table = pa.table(arrays)
    return FileResult(table, rejected, summary, notes)


def file_preview(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return ""
    return head.decode("utf-8", errors="backslashreplace")
