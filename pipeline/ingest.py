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

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import FIELDS, StageResult, clip_raw, empty_records, rejects_frame

SUFFIXES = (".json", ".jsonl")
STAGE = "ingest"

_EXACT_KEYS = frozenset(FIELDS)
_JSON_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_DECODER = json.JSONDecoder()
_SCAN = _DECODER.scan_once


class FileRejected(Exception):
    """The whole file cannot be used; the message says why."""


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


# --------------------------------------------------------------------------- files


def discover_files(raw_dir: Path) -> tuple[list[Path], list[tuple[str, str]], list[str]]:
    """Files to read (sorted), files refused with a reason, and files ignored for their suffix."""
    raw_dir = Path(raw_dir)
    root = raw_dir.resolve()
    found: list[tuple[str, Path]] = []
    refused: list[tuple[str, str]] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(raw_dir, followlinks=False):
        for d in list(dirnames):
            full = Path(dirpath) / d
            if full.is_symlink():
                dirnames.remove(d)
                rel = full.relative_to(raw_dir).as_posix()
                refused.append((rel, f"symlinked folder {rel!r} is not followed"))
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(raw_dir).as_posix()
            if not name.lower().endswith(SUFFIXES):
                ignored.append(rel)
                continue
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(root):
                    refused.append((rel, f"symlink points outside the raw folder (to {target}); refused"))
                    continue
            if not full.is_file():
                refused.append((rel, "not a regular file"))
                continue
            found.append((rel, full))
    found.sort(key=lambda item: item[0])
    refused.sort()
    ignored.sort()
    return [p for _, p in found], refused, ignored


# ----------------------------------------------------------------------- encodings

_BOMS = (
    (b"\x00\x00\xfe\xff", None, "UTF-32 (big-endian BOM)"),
    (b"\xff\xfe\x00\x00", None, "UTF-32 (little-endian BOM)"),
    (b"\xef\xbb\xbf", "utf-8", "utf-8-sig"),
    (b"\xff\xfe", "utf-16-le", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be", "utf-16-be"),
)


def decode_lines(data: bytes) -> tuple[str, str, dict[int, str]]:
    """Decode a whole file: ``(text, encoding, {line_number: reason})``, or raise :class:`FileRejected`.

    Lines that are neither UTF-8 nor GB18030 become a marker line that the JSON parser rejects as
    a broken row, with the reason given here.
    """
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            if codec is None:
                raise FileRejected(f"encoded as {label}; supported are UTF-8, UTF-16 with BOM and GB18030")
            try:
                return data[len(bom) :].decode(codec), label, {}
            except UnicodeDecodeError as exc:
                raise FileRejected(
                    f"declares {label} by its byte-order mark but is not valid {label} "
                    f"(byte offset {exc.start + len(bom)}: {exc.reason})"
                ) from None
    head = data[:4096]
    nuls = head.count(0)
    if len(head) >= 4 and nuls > len(head) // 4:
        # JSON text never holds raw NUL bytes. UTF-16 without a BOM has them on one parity
        # (the high byte of ASCII characters); anything else is binary data.
        even = head[0::2].count(0)
        if max(even, nuls - even) >= 0.9 * nuls:
            raise FileRejected("looks like UTF-16 without a byte-order mark; save it as UTF-8 or UTF-16 with BOM")
        raise FileRejected(f"binary data, not text ({nuls} NUL bytes in the first {len(head)} bytes)")
    try:
        return data.decode("utf-8"), "utf-8", {}
    except UnicodeDecodeError as exc:
        first_error = exc
    # Not UTF-8 as a whole: decode line by line so that a file mixing UTF-8 and GB18030 keeps
    # both. ``\n`` (0x0A) never occurs inside a multi-byte GB18030 or UTF-8 sequence.
    lines = data.split(b"\n")
    out: list[str] = []
    used: Counter[str] = Counter()
    bad: dict[int, str] = {}
    for lineno, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8"))
            if not raw.isascii():
                used["utf-8"] += 1
            continue
        except UnicodeDecodeError:
            pass
        try:
            out.append(raw.decode("gb18030"))
            used["gb18030"] += 1
        except UnicodeDecodeError as exc:
            bad[lineno] = f"line is neither UTF-8 nor GB18030 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            out.append("\x00")  # never valid JSON: the parser rejects this line/element
    if not used["gb18030"]:
        raise FileRejected(
            f"not valid UTF-8 (byte offset {first_error.start}: {first_error.reason}) and not GB18030 either"
        )
    if len(bad) > max(1, len(lines) // 2):
        raise FileRejected(f"not text in a supported encoding ({len(bad)} of {len(lines)} lines undecodable)")
    encoding = "gb18030" if not used["utf-8"] else "mixed utf-8 + gb18030"
    return "\n".join(out), encoding, bad


# --------------------------------------------------------------------------- parsing


@dataclass
class Parsed:
    """Parsed JSON values of one file with their positions (1-based line, 0-based index)."""

    lines: list[int] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    source_lines: list[str] | None = None  # JSON Lines: the file's lines, for rejected rows' text
    errors: list[tuple[int, int, str, str]] = field(default_factory=list)  # (line, index, reason, raw)
    format: str = ""
    blank_lines: int = 0
    notes: list[str] = field(default_factory=list)


def _json_error(exc: Exception) -> str:
    msg = str(exc)
    return f"invalid JSON: {msg}"


def normalise_line_ends(text: str) -> str:
    """CRLF and lone CR (old Mac files) become LF. Safe for JSON: a raw CR is only ever whitespace
    (inside a string it must be escaped), and line numbers stay those an editor shows."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_text(text: str, bad_lines: dict[int, str] | None = None) -> Parsed:
    """Sniff the format of a decoded file and parse it into values, keeping broken rows as errors.

    Keys given twice in one object with different values (which JSON parsers silently resolve
    to the last) are caught: such a record carries :data:`DUPLICATE_KEYS` and is rejected.
    """
    bad_lines = bad_lines or {}
    text = normalise_line_ends(text)
    parsed = _parse(text, bad_lines, strict_keys=False)
    if _may_repeat_keys(text, parsed):
        parsed = _parse(text, bad_lines, strict_keys=True)
    return parsed


def _parse(text: str, bad_lines: dict[int, str], strict_keys: bool) -> Parsed:
    start = _JSON_WS.match(text).end()
    if start == len(text):
        raise FileRejected("empty file" if not text else "file holds only whitespace")
    first = text[start]
    if first == "[":
        return _parse_array(text, start, bad_lines, strict_keys)
    if first == "{":
        try:
            value, end = (_STRICT_DECODER if strict_keys else _DECODER).raw_decode(text, start)
        except (ValueError, RecursionError):
            return _parse_lines(text, bad_lines, strict_keys)
        if _JSON_WS.match(text, end).end() == len(text):
            if isinstance(value, dict) and _looks_like_record(value):
                parsed = Parsed(format="single JSON object")
                parsed.lines.append(text.count("\n", 0, start) + 1)
                parsed.indexes.append(0)
                parsed.values.append(value)
                return parsed
            return _parse_wrapper(text, start, value, bad_lines, strict_keys)
        return _parse_lines(text, bad_lines, strict_keys)
    snippet = text[start : start + 20]
    raise FileRejected(f"not JSON: expected '[' or '{{' at line {text.count(chr(10), 0, start) + 1}, found {snippet!r}")


# A key given twice with different values: the record carries this marker key (never a valid
# field name: it starts with NUL) naming the keys, and is rejected with that reason.
DUPLICATE_KEYS = "\x00duplicate keys"


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    dups: list[str] = []
    for key, value in pairs:
        if key in out and out[key] != value and key not in dups:
            dups.append(key)
        out[key] = value
    if dups:
        out[DUPLICATE_KEYS] = dups
    return out


_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_hook)


def _may_repeat_keys(text: str, parsed: Parsed) -> bool:
    """Cheap test: does any field name occur in the text more often than the parsed records (and
    the broken rows) account for? Then the file is parsed again with duplicate keys caught."""
    for key in FIELDS:
        quoted = f'"{key}"'
        in_text = text.count(quoted)
        if not in_text:
            continue
        held = sum(1 for v in parsed.values if type(v) is dict and key in v)
        held += sum(e[3].count(quoted) for e in parsed.errors)
        if in_text > held:
            return True
    return False


def _repeats_a_key(line: str) -> bool:
    return any(line.count(f'"{key}"') > 1 for key in FIELDS)


def _parse_wrapper(text: str, start: int, value: Any, bad_lines: dict[int, str], strict_keys: bool) -> Parsed:
    """A top-level object that is not itself a record: ``{"data": [records...], ...}`` (records
    under the one key that holds a list), or ``{"id1": {record}, "id2": {record}}``."""
    keys = list(value) if isinstance(value, dict) else []
    lists = [k for k in keys if isinstance(value[k], list)]
    members = _members(text, start)
    if len(lists) == 1 and any(isinstance(v, dict) for v in value[lists[0]]):
        key = lists[0]
        pos = [p for k, p, _ in members if k == key][-1]  # the last one, as the parser kept
        parsed = _parse_array(text, pos, bad_lines, strict_keys, nested=True)
        others = [k for k in keys if k != key]
        parsed.format = f"JSON object with the records under {key!r}"
        parsed.notes.append(
            f"records read from the top-level key {key!r}"
            + (f"; other top-level keys ignored: {', '.join(map(repr, others[:5]))}" if others else "")
        )
        return parsed
    if keys and all(isinstance(value[k], dict) and _looks_like_record(value[k]) for k in keys):
        scan = (_STRICT_DECODER if strict_keys else _DECODER).scan_once
        parsed = Parsed(format="JSON object of records")
        for index, (_key, pos, line) in enumerate(members):
            parsed.lines.append(line)
            parsed.indexes.append(index)
            parsed.values.append(scan(text, pos)[0])
        parsed.notes.append("top-level object of records keyed by id: the keys are ignored")
        return parsed
    shown = ", ".join(repr(k) for k in keys[:5])
    raise FileRejected(
        f"top-level JSON object (keys {shown}) is not a record and holds no list of records: "
        "expected an array of records or JSON Lines"
    )


def _members(text: str, start: int) -> list[tuple[str, int, int]]:
    """(key, position of the value, its line) of each member of the valid JSON object at ``start``."""
    ws = _JSON_WS.match
    out = []
    pos = ws(text, start + 1).end()
    while pos < len(text) and text[pos] != "}":
        key, pos = _SCAN(text, pos)
        pos = ws(text, ws(text, pos).end() + 1).end()  # past the ':'
        out.append((key, pos, text.count("\n", 0, pos) + 1))
        _value, end = _SCAN(text, pos)
        pos = ws(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws(text, pos + 1).end()
    return out


def _looks_like_record(obj: dict) -> bool:
    return any(isinstance(k, str) and k.strip().lower() in ("instruction", "output") for k in obj)


def _parse_lines(text: str, bad_lines: dict[int, str], strict_keys: bool = False) -> Parsed:
    parsed = Parsed(format="JSON Lines")
    pieces = text.split("\n")
    if pieces and pieces[-1] == "":
        pieces.pop()  # the newline that ends the last line does not open another one
    nonblank = [i for i, line in enumerate(pieces) if line and not line.isspace()]
    parsed.blank_lines = len(pieces) - len(nonblank)
    parsed.source_lines = pieces
    loads = orjson.loads
    lines, indexes, values = parsed.lines, parsed.indexes, parsed.values
    for index, i in enumerate(nonblank):
        if i + 1 in bad_lines:
            parsed.errors.append((i + 1, index, bad_lines[i + 1], pieces[i]))
            continue
        try:
            strict = strict_keys and _repeats_a_key(pieces[i])
            values.append(_STRICT_DECODER.decode(pieces[i]) if strict else loads(pieces[i]))
        except (ValueError, RecursionError):
            # orjson refuses NaN, Infinity and lone surrogates, which the standard library reads
            # (the field checks and validation then reject them with a clear reason); its
            # messages also name the position and the problem.
            try:
                values.append(json.loads(pieces[i]))
            except ValueError as std_exc:
                parsed.errors.append((i + 1, index, _json_error(std_exc), pieces[i]))
                continue
            except RecursionError:
                parsed.errors.append((i + 1, index, "invalid JSON: nested too deeply", pieces[i]))
                continue
        lines.append(i + 1)
        indexes.append(index)
    return parsed


def _parse_array(text: str, start: int, bad_lines: dict[int, str], strict_keys: bool = False, nested: bool = False) -> Parsed:
    """Element by element, so that one broken element costs that element only.

    After a broken element, parsing resumes at the next line that starts a new object. Arrays
    written one after another (``[...][...]``) are read as one. ``nested``: the array sits inside
    a top-level object; stop at its closing ``]``.
    """
    parsed = Parsed(format="JSON array")
    scan = _STRICT_DECODER.scan_once if strict_keys else _SCAN
    n = len(text)
    pos = start + 1
    line = text.count("\n", 0, pos) + 1
    last = pos
    index = 0
    resync = re.compile(r"\n[ \t\r]*\{")
    ws = _JSON_WS.match
    while True:
        pos = ws(text, pos).end()
        if pos >= n:
            parsed.notes.append("array not closed (truncated file?)")
            if parsed.errors and parsed.errors[-1][1] == index - 1 and not parsed.errors[-1][3].endswith("}"):
                # the last element is the one cut short: one row, not two
                e_line, e_index, e_reason, e_raw = parsed.errors[-1]
                parsed.errors[-1] = (e_line, e_index, f"truncated JSON (the file ends inside this element): {e_reason}", e_raw)
            else:
                line += text.count("\n", last, pos)
                parsed.errors.append((line, index, "truncated JSON: the array is not closed with ']' (rows after this point may be missing)", ""))
            break
        ch = text[pos]
        if ch == "]":
            if nested:
                break
            tail = ws(text, pos + 1).end()
            if tail != n and text[tail] == "[":
                parsed.notes.append("several JSON arrays one after another: read as one")
                pos = tail + 1
                continue
            if tail != n:
                line += text.count("\n", last, tail)
                parsed.errors.append((line, index, "invalid JSON: extra text after the closing ']'", clip_raw(text[tail:])))
            break
        line += text.count("\n", last, pos)
        last = pos
        try:
            value, end = scan(text, pos)
        except StopIteration:
            err_end = _error_end(text, pos, resync)
            reason = bad_lines.get(line) or _element_reason(text, pos)
            parsed.errors.append((line, index, reason, clip_raw(text[pos:err_end].rstrip(", \t\r\n"))))
            index += 1
            pos = err_end
            continue
        except (ValueError, RecursionError) as exc:
            err_end = _error_end(text, pos, resync)
            reason = bad_lines.get(line) or (
                _json_error(exc) if isinstance(exc, ValueError) else "invalid JSON: nested too deeply"
            )
            parsed.errors.append((line, index, reason, clip_raw(text[pos:err_end].rstrip(", \t\r\n"))))
            index += 1
            pos = err_end
            continue
        parsed.lines.append(line)
        parsed.indexes.append(index)
        parsed.values.append(value)
        index += 1
        pos = ws(text, end).end()
        if pos < n and text[pos] == ",":
            nxt = ws(text, pos + 1).end()
            if nxt < n and text[nxt] == "]":
                parsed.notes.append("trailing comma before ']' tolerated")
            pos = nxt
        elif pos < n and text[pos] not in "]":
            # a missing comma between elements: carry on from here and let the next element tell
            parsed.notes.append(f"missing ',' after the element at line {line} tolerated")
    return parsed


def _error_end(text: str, pos: int, resync: re.Pattern) -> int:
    m = resync.search(text, pos + 1)
    return m.start() + 1 if m else len(text)


def _element_reason(text: str, pos: int) -> str:
    try:
        _DECODER.raw_decode(text, pos)
    except ValueError as exc:
        return _json_error(exc)
    return "invalid JSON value"


# -------------------------------------------------------------------------- records

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
