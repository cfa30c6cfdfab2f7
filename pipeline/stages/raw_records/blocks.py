"""Large raw files read in blocks, so that ``raw_records`` holds one block of a file in memory,
not the file: the rows, rejected rows and messages are those of reading the file whole.

A file over ``stream_over`` bytes is streamed when it is UTF-8 throughout (with or without BOM;
checked block by block before any row is read) and is a JSON array or JSON Lines (sniffed as
for any file). Blocks end at a newline, so no line and no multi-byte character is cut:

* JSON Lines: each block is parsed as lines, numbered from where the block starts;
* JSON arrays: the array parser reads through a window on the text (``arrays.Window``) that
  takes the next block when an element runs past its end and drops what it has parsed.

Anything else (UTF-16, GB18030 or mixed encodings, a top-level object wrapping the records, a
file whose first line is broken) is read whole as before: memory then grows with that file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa

from pipeline.stages.raw_records.arrays import Window, iter_array
from pipeline.stages.raw_records.json_recovery import _JSON_WS, _may_repeat_keys, _parse_lines, normalise_line_ends
from pipeline.stages.raw_records.rows import (STAGE, FileResult, FileSummary, _file_preview, extra_fields_note, ingest_file,
                                             rows_of)

STREAM_BYTES = 64 << 20  # files above this size are read in blocks
BLOCK_BYTES = 8 << 20
PIECE_ROWS = 100_000  # an array's rows are handed on in pieces of this many
_BOM = b"\xef\xbb\xbf"


def read_blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """The file in blocks of about ``block_bytes`` that end at a newline (the last where the file ends)."""
    with open(path, "rb") as fh:
        carry = b""
        while True:
            data = fh.read(block_bytes)
            if not data:
                if carry:
                    yield carry
                return
            data = carry + data if carry else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data  # one line longer than a block: read on
                continue
            yield data[:cut]
            carry = data[cut:]


def _is_utf8(block: bytes) -> bool:
    """UTF-8 validation in Arrow (vectorised): the block as one binary value cast to a string."""
    try:
        pa.array([block], pa.large_binary()).cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _texts(path: Path, block_bytes: int) -> Iterator[str]:
    first = True
    for block in read_blocks(path, block_bytes):
        if first and block.startswith(_BOM):
            block = block[len(_BOM):]
        first = False
        yield normalise_line_ends(block.decode("utf-8"))


def _format(path: Path, block_bytes: int) -> str | None:
    """``"array"``, ``"lines"``, or None when the file must be read whole."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")) or head.count(0) > len(head) // 4:
        return None
    if not all(_is_utf8(b) for b in read_blocks(path, block_bytes)):
        return None
    texts = _texts(path, block_bytes)
    text = next(texts, "")
    start = _JSON_WS.match(text).end()
    if text[start:start + 1] == "[":
        return "array"
    if text[start:start + 1] == "{":
        end = text.find("\n", start)
        if end < 0:
            return None
        try:
            if not isinstance(orjson.loads(text[start:end]), dict):
                return None
        except orjson.JSONDecodeError:
            return None
        # one object and nothing after it is a single-record file, not JSON Lines
        after = text[end:]
        while not after.strip():
            after = next(texts, None)
            if after is None:
                return None
        return "lines"
    return None


def iter_file(path: Path, rel: str, stream_over: int = STREAM_BYTES, block_bytes: int = BLOCK_BYTES,
              piece_rows: int = PIECE_ROWS) -> Iterator[FileResult]:
    """:func:`~pipeline.stages.raw_records.rows.ingest_file` in pieces: the same rows in the same
    order. Every piece but the last has ``summary`` None; the last carries the file's summary."""
    try:
        big = path.stat().st_size > stream_over
    except OSError:
        big = False
    kind = _format(path, block_bytes) if big else None
    if kind is None:
        yield ingest_file(path, rel)
        return
    with open(path, "rb") as fh:
        bom = fh.read(3) == _BOM
    summary = FileSummary(source_file=rel, encoding="utf-8-sig" if bom else "utf-8",
                          format="JSON array" if kind == "array" else "JSON Lines")
    note_lists: dict[int, list[str]] = {}  # an array's pieces share one list of notes
    extra: Counter[str] = Counter()
    pieces = _array_pieces(path, block_bytes, piece_rows) if kind == "array" else _line_pieces(path, block_bytes, summary)
    for parsed in pieces:
        note_lists[id(parsed.notes)] = parsed.notes
        result = rows_of(parsed, rel, extra)
        summary.rows_kept += result.summary.rows_kept
        summary.rows_rejected += result.summary.rows_rejected
        result.summary = None
        yield result
    notes = [note for notes in note_lists.values() for note in notes]
    if extra:
        notes.append(extra_fields_note(extra))
    summary.notes = sorted(set(notes))
    if kind == "array" and summary.rows_kept + summary.rows_rejected == 0:
        summary.error = "the JSON array holds no records"
        summary.rows_rejected = 1
        summary.format, summary.notes = "", []  # as for any file rejected whole
        rejected = [{"source_file": rel, "source_line": None, "source_index": None, "stage": STAGE,
                     "reason": f"file rejected: {summary.error}", "raw": _file_preview(path)}]
    else:
        rejected = []
    summary.rows_read = summary.rows_kept + summary.rows_rejected
    yield FileResult(None, rejected, summary)


def _array_pieces(path: Path, block_bytes: int, piece_rows: int):
    texts = _texts(path, block_bytes)
    win = Window(next(texts), texts)
    start = _JSON_WS.match(win.text).end()
    yield from iter_array(win, start, {}, piece_rows=piece_rows)


def _line_pieces(path: Path, block_bytes: int, summary: FileSummary):
    line_base = index_base = 0
    for text in _texts(path, block_bytes):
        parsed = _parse_lines(text, {}, False)
        if _may_repeat_keys(text, parsed):
            parsed = _parse_lines(text, {}, True)
        n_lines = len(parsed.source_lines)
        parsed.line_base = line_base
        parsed.lines = [line + line_base for line in parsed.lines]
        parsed.indexes = [index + index_base for index in parsed.indexes]
        parsed.errors = [(line + line_base, index + index_base, reason, raw) for line, index, reason, raw in parsed.errors]
        summary.blank_lines += parsed.blank_lines
        line_base += n_lines
        index_base += n_lines - parsed.blank_lines
        yield parsed
