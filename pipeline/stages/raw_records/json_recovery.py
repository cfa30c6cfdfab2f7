"""JSON arrays, JSON Lines and single objects, parsed so that a broken line or array element
rejects that row only, with positions for every value and reasons for every break."""

from __future__ import annotations

import json
from typing import Any

import orjson

from pipeline.core.records import FIELDS
from pipeline.stages.raw_records.arrays import Window, iter_array
from pipeline.stages.raw_records.decoding import FileRejected
from pipeline.stages.raw_records.json_values import DECODER, JSON_WS, SCAN, STRICT_DECODER, Parsed


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
    if may_repeat_keys(text, parsed):
        parsed = _parse(text, bad_lines, strict_keys=True)
    return parsed


def _parse(text: str, bad_lines: dict[int, str], strict_keys: bool) -> Parsed:
    start = JSON_WS.match(text).end()
    if start == len(text):
        raise FileRejected("empty file" if not text else "file holds only whitespace")
    first = text[start]
    if first == "[":
        parsed = _parse_array(text, start, bad_lines, strict_keys)
        if not parsed.values and not parsed.errors:
            raise FileRejected("the JSON array holds no records")  # said, not silently nothing
        return parsed
    if first == "{":
        try:
            value, end = (STRICT_DECODER if strict_keys else DECODER).raw_decode(text, start)
        except (ValueError, RecursionError):
            return parse_lines(text, bad_lines, strict_keys)
        if JSON_WS.match(text, end).end() == len(text):
            if isinstance(value, dict) and _looks_like_record(value):
                parsed = Parsed(format="single JSON object")
                parsed.lines.append(text.count("\n", 0, start) + 1)
                parsed.indexes.append(0)
                parsed.values.append(value)
                return parsed
            return _parse_wrapper(text, start, value, bad_lines, strict_keys)
        return parse_lines(text, bad_lines, strict_keys)
    snippet = text[start : start + 20]
    raise FileRejected(f"not JSON: expected '[' or '{{' at line {text.count(chr(10), 0, start) + 1}, found {snippet!r}")


# A key given twice with different values: the record carries this marker key (never a valid
# field name: it starts with NUL) naming the keys, and is rejected with that reason.
def may_repeat_keys(text: str, parsed: Parsed) -> bool:
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
        scan = (STRICT_DECODER if strict_keys else DECODER).scan_once
        parsed = Parsed(format="JSON object of records")
        for index, (_key, pos, line) in enumerate(members):
            parsed.lines.append(line)
            parsed.indexes.append(index)
            parsed.values.append(scan(text, pos)[0])
        parsed.notes.append("top-level object of records keyed by id: the keys are ignored")
        return parsed
    shown = ", ".join(repr(k) for k in keys[:5])
    raise FileRejected(
        f"top-level JSON object (keys {shown}) is not a record and holds no list of records: expected an array of "
        "records or JSON Lines"
    )


def _members(text: str, start: int) -> list[tuple[str, int, int]]:
    """(key, position of the value, its line) of each member of the valid JSON object at ``start``."""
    ws = JSON_WS.match
    out = []
    pos = ws(text, start + 1).end()
    while pos < len(text) and text[pos] != "}":
        key, pos = SCAN(text, pos)
        pos = ws(text, ws(text, pos).end() + 1).end()  # past the ':'
        out.append((key, pos, text.count("\n", 0, pos) + 1))
        _value, end = SCAN(text, pos)
        pos = ws(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws(text, pos + 1).end()
    return out


def _looks_like_record(obj: dict) -> bool:
    return any(isinstance(k, str) and k.strip().lower() in ("instruction", "output") for k in obj)


def parse_lines(text: str, bad_lines: dict[int, str], strict_keys: bool = False) -> Parsed:
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
            values.append(STRICT_DECODER.decode(pieces[i]) if strict else loads(pieces[i]))
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


def _parse_array(
    text: str, start: int, bad_lines: dict[int, str], strict_keys: bool = False, nested: bool = False
) -> Parsed:
    """The array at ``start``, element by element (``arrays.iter_array`` over the whole text)."""
    return next(iter_array(Window(text), start, bad_lines, strict_keys, nested))
