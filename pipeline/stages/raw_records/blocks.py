"""Large raw files read in blocks, so that ``raw_records`` holds one block of a file in memory,
not the file: the rows, rejected rows and messages are those of reading the file whole.

A file over ``stream_over`` bytes is streamed when it is UTF-8 throughout (with or without BOM;
checked block by block, in a first pass over the file, before any row is read) and is a JSON
array or JSON Lines (sniffed as for any file). Blocks are cut anywhere, so a minified array (one
line of any length) is read in bounded memory like any other:

* bytes are decoded incrementally: a character split between two blocks is decoded whole, and a
  CR at a block's end waits for the next block to say whether an LF follows;
* JSON Lines: the decoded text is handed on up to its last newline, each piece parsed as lines
  numbered from where it starts (a single line longer than a block is held until it ends);
* JSON arrays: the array parser reads through a window on the text (``arrays.Window``) that
  takes the next block when an element runs past its end and drops what it has parsed.

Anything else (UTF-16, GB18030 or mixed encodings, a top-level object wrapping the records, a
file whose first line is broken) is read whole as before: memory then grows with that file.
"""

from __future__ import annotations

import codecs
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa

from pipeline.stages.raw_records.arrays import Window, iter_array
from pipeline.stages.raw_records.json_recovery import may_repeat_keys, normalise_line_ends, parse_lines
from pipeline.stages.raw_records.json_values import JSON_WS
from pipeline.stages.raw_records.rows import (
    STAGE,
    FileResult,
    FileSummary,
    extra_fields_note,
    file_preview,
    ingest_file,
    rows_of,
)

STREAM_BYTES = 64 << 20  # files above this size are read in blocks
BLOCK_BYTES = 8 << 20
PIECE_ROWS = 100_000  # an array's rows are handed on in pieces of this many
_BOM = b"\xef\xbb\xbf"
_SNIFF_CHARS = 64 << 20  # the longest first line sniffed as JSON Lines


def read_blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """The file's bytes in blocks of ``block_bytes`` (the last shorter), cut anywhere."""
    with open(path, "rb") as fh:
        while data := fh.read(block_bytes):
            yield data


def _incomplete_tail(block: bytes) -> int:
    """How many bytes at the end of ``block`` begin a UTF-8 character that the block cuts short."""
    for back in range(1, min(4, len(block)) + 1):
        byte = block[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): the character starts here
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0  # four continuation bytes in a row: invalid, left for the check to find


def _is_utf8_file(path: Path, block_bytes: int) -> bool:
    """UTF-8 validation in Arrow (vectorised), one block at a time; a character cut by a block's
    end is carried into the next block."""
    carry = b""
    for block in read_blocks(path, block_bytes):
        block = carry + block
        cut = len(block) - _incomplete_tail(block)
        carry = block[cut:]
        try:
            pa.array([block[:cut]], pa.large_binary()).cast(pa.large_string())
        except pa.ArrowInvalid:
            return False
    return not carry


def _texts(path: Path, block_bytes: int) -> Iterator[str]:
    """The file's text block by block: BOM dropped, decoded incrementally, line ends normalised."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    held = ""
    for block in read_blocks(path, block_bytes):
        text = held + decoder.decode(block)
        held = ""
        if text.endswith("\r"):  # CR LF may be cut between two blocks: wait for the next one
            text, held = text[:-1], "\r"
        yield normalise_line_ends(text)
    tail = held + decoder.decode(b"", final=True)
    if tail:
        yield normalise_line_ends(tail)


def _line_texts(texts: Iterator[str]) -> Iterator[str]:
    """``texts`` re-cut to end at a newline (the last where the file ends)."""
    carry: list[str] = []
    for text in texts:
        cut = text.rfind("\n") + 1
        if cut == 0:
            carry.append(text)  # one line longer than a block: read on
            continue
        yield "".join(carry) + text[:cut]
        carry = [text[cut:]]
    rest = "".join(carry)
    if rest:
        yield rest


def _head(texts: Iterator[str]) -> str:
    """The text from the file's start up to its first character that is not JSON white space."""
    text = ""
    for piece in texts:
        text += piece
        if JSON_WS.match(text).end() < len(text):
            break
    return text


def _format(path: Path, block_bytes: int) -> str | None:
    """``"array"``, ``"lines"``, or None when the file must be read whole."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")) or head.count(0) > len(head) // 4:
        return None
    if not _is_utf8_file(path, block_bytes):
        return None
    texts = _texts(path, block_bytes)
    text = _head(texts)
    start = JSON_WS.match(text).end()
    if text[start : start + 1] == "[":
        return "array"
    if text[start : start + 1] == "{":
        end = text.find("\n", start)
        while end < 0 and len(text) - start <= _SNIFF_CHARS:
            piece = next(texts, None)
            if piece is None:
                return None
            text += piece
            end = text.find("\n", start)
        if end < 0:
            return None  # a first line of over _SNIFF_CHARS: not JSON Lines as anyone writes it
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


def iter_file(
    path: Path, rel: str, stream_over: int = STREAM_BYTES, block_bytes: int = BLOCK_BYTES, piece_rows: int = PIECE_ROWS
) -> Iterator[FileResult]:
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
    summary = FileSummary(
        source_file=rel,
        encoding="utf-8-sig" if bom else "utf-8",
        format="JSON array" if kind == "array" else "JSON Lines",
    )
    note_lists: dict[int, list[str]] = {}  # an array's pieces share one list of notes
    extra: Counter[str] = Counter()
    pieces = (
        _array_pieces(path, block_bytes, piece_rows) if kind == "array" else _line_pieces(path, block_bytes, summary)
    )
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
        rejected = [
            {
                "source_file": rel,
                "source_line": None,
                "source_index": None,
                "stage": STAGE,
                "reason": f"file rejected: {summary.error}",
                "raw": file_preview(path),
            }
        ]
    else:
        rejected = []
    summary.rows_read = summary.rows_kept + summary.rows_rejected
    yield FileResult(None, rejected, summary)


def _array_pieces(path: Path, block_bytes: int, piece_rows: int):
    texts = _texts(path, block_bytes)
    win = Window(_head(texts), texts)
    start = JSON_WS.match(win.text).end()
    yield from iter_array(win, start, {}, piece_rows=piece_rows)


def _line_pieces(path: Path, block_bytes: int, summary: FileSummary):
    line_base = index_base = 0
    for text in _line_texts(_texts(path, block_bytes)):
        parsed = parse_lines(text, {}, False)
        if may_repeat_keys(text, parsed):
            parsed = parse_lines(text, {}, True)
        n_lines = len(parsed.source_lines)
        parsed.line_base = line_base
        parsed.lines = [line + line_base for line in parsed.lines]
        parsed.indexes = [index + index_base for index in parsed.indexes]
        parsed.errors = [
            (line + line_base, index + index_base, reason, raw) for line, index, reason, raw in parsed.errors
        ]
        summary.blank_lines += parsed.blank_lines
        line_base += n_lines
        index_base += n_lines - parsed.blank_lines
        yield parsed
