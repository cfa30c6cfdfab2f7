"""Stage 1 (asset ``raw_records``): read raw Alpaca JSON / JSON Lines files into rows.

* Files: every ``*.json`` and ``*.jsonl`` under the raw folder, recursively, in sorted order of
  their path relative to that folder. A symlink that points outside the raw folder is refused.
* Encodings: UTF-8 (with or without BOM), UTF-16 with BOM and GB18030. A file without BOM that
  is not UTF-8 as a whole is decoded line by line (UTF-8, else GB18030), so a dump that mixes
  both keeps its UTF-8 lines intact instead of turning them into mojibake.
* Formats: a JSON array of objects, JSON Lines, or a single JSON object that is one record.
  The format is sniffed from the content, not the file name.
* Rows: ``instruction``, ``input``, ``output`` (keys matched case-insensitively, surrounding
  spaces ignored); a missing ``input`` is "". A value that is not a string rejects the row with
  its reason; a broken JSON Lines line or array element rejects that row only.

Every row read ends either in ``StageResult.kept`` or in ``StageResult.rejected``; a file that
cannot be used at all is one rejected row with ``source_line`` empty.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.records import FIELDS, StageResult, clip_raw, empty_records, rejects_frame
from pipeline.stages.raw_records.decoding import FileRejected, decode_lines
from pipeline.stages.raw_records.files import EMPTY, SUFFIXES, discover_files, raw_fingerprint
from pipeline.stages.raw_records.json_recovery import DUPLICATE_KEYS, Parsed, parse_text

__all__ = ["EMPTY", "SUFFIXES", "FileRejected", "FileSummary", "Parsed", "decode_lines", "discover_files",
           "ingest", "ingest_file", "parse_text", "raw_fingerprint"]

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


_TYPE_NAMES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
               dict: "an object", str: "a string"}


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
        return f"key {dups[0]!r} given twice in one record with different values (a JSON parser would silently keep the last)"
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
    if not pc.any(pc.match_substring(arr, "\r")).as_py():
        return arr
    return pc.replace_substring(pc.replace_substring(arr, "\r\n", "\n"), "\r", "\n")


def _split_fields(parsed: Parsed, rel: str, rejected: list[dict]) -> tuple[list, list, list, list, list]:
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
    extra: Counter[str] = Counter()
    for k, ok in enumerate(fast):
        if ok:
            fields = (ins[k], inp[k], out[k])
        else:
            value = values[k]
            if type(value) is dict:
                extra.update(key for key in value if key != DUPLICATE_KEYS and key.strip().lower() not in FIELDS)
            fields = _fields_of(value) if type(value) is dict else f"record is {_type_name(value)}, expected a JSON object"
            if type(fields) is str:
                if parsed.source_lines is not None:
                    raw = parsed.source_lines[lines[k] - 1]
                else:
                    raw = json.dumps(value, ensure_ascii=False, default=str, allow_nan=True)
                rejected.append({"source_file": rel, "source_line": lines[k], "source_index": indexes[k],
                                 "stage": STAGE, "reason": fields, "raw": clip_raw(raw)})
                continue
        l_col.append(lines[k])
        x_col.append(indexes[k])
        i_col.append(fields[0])
        n_col.append(fields[1])
        o_col.append(fields[2])
    if extra:
        shown = ", ".join(f"{key!r} ({n})" for key, n in extra.most_common(8))
        parsed.notes.append(f"fields other than instruction/input/output ignored: {shown}")
    return cols


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
            {"source_file": rel, "source_line": None, "source_index": None, "stage": STAGE,
             "reason": f"file rejected: {exc}", "raw": _file_preview(path)}
        )
        return FileResult(None, rejected, summary)
    summary.format = parsed.format
    summary.blank_lines = parsed.blank_lines
    for line, index, reason, raw in parsed.errors:
        rejected.append({"source_file": rel, "source_line": line, "source_index": index, "stage": STAGE,
                         "reason": reason, "raw": clip_raw(raw)})
    lines_col, index_col, ins_col, inp_col, out_col = _split_fields(parsed, rel, rejected)
    summary.notes = sorted(set(parsed.notes))
    del parsed
    rejected.sort(key=lambda r: (r["source_index"], r["source_line"]))
    summary.rows_kept = len(lines_col)
    summary.rows_rejected = len(rejected)
    summary.rows_read = summary.rows_kept + summary.rows_rejected
    notes: Counter[str] = Counter()
    table = None
    del text
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


def _file_preview(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return ""
    return head.decode("utf-8", errors="backslashreplace")


def ingest(raw_dir: str | os.PathLike) -> StageResult:
    """Read every raw file under ``raw_dir`` into one table of rows plus the rows rejected."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder {raw_dir} does not exist; put *.json or *.jsonl files there")
    files, refused, ignored = discover_files(raw_dir)
    rejected: list[dict] = [
        {"source_file": rel, "source_line": None, "source_index": None, "stage": STAGE,
         "reason": f"file rejected: {reason}", "raw": ""}
        for rel, reason in refused
    ]
    summaries = [FileSummary(source_file=rel, error=reason, rows_read=1, rows_rejected=1) for rel, reason in refused]
    tables: list[pa.Table] = []
    notes: Counter[str] = Counter()
    for path in files:
        result = ingest_file(path, path.relative_to(raw_dir).as_posix())
        rejected.extend(result.rejected)
        summaries.append(result.summary)
        notes.update(result.notes)
        if result.table is not None:
            tables.append(result.table)
    if tables:
        table = pa.concat_tables(tables)
        kept = table.to_pandas(types_mapper={pa.large_string(): pd.StringDtype("pyarrow", na_value=float("nan"))}.get)
    else:
        kept = empty_records()
    summaries.sort(key=lambda s: s.source_file)
    stats = {
        "files_read": len(files),
        "files_rejected": sum(1 for s in summaries if s.error),
        "files_ignored": ignored,
        "rows_read": len(kept) + len(rejected),
        "rows_kept": len(kept),
        "rows_rejected": len(rejected),
        "files": [s.__dict__ for s in summaries],
        "notes": dict(notes),
    }
    return StageResult(kept=kept, rejected=rejects_frame(rejected), stats=stats)
