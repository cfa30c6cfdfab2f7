"""JSON arrays element by element, through a window on the text: the whole text of a small file,
or decoded blocks of a large one appended as the parser needs them and dropped once parsed, so
that a file of any size is read in bounded memory with the same rows, errors and messages.

A broken element costs that element only: parsing resumes at the next ``{`` that starts a line
or follows a comma (a minified array has one line). Arrays written one after another (``[...][...]``) are read as one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from pipeline.core.records import clip_raw
from pipeline.stages.raw_records.json_values import JSON_WS, SCAN, STRICT_DECODER, Parsed

_DECODER = json.JSONDecoder()
_Q_INSTRUCTION, _Q_INPUT, _Q_OUTPUT = '"instruction"', '"input"', '"output"'
# where the element after a broken one starts: a "{" first on its line, or after a comma (in an
# object a key follows a comma, never a "{"): a minified array has no lines to resume at
_RESYNC = re.compile(r"\n[ \t\r]*(?=\{)|,[ \t\r\n]*(?=\{)")
# a window drops the text it has parsed once that much lies behind the parser
_COMPACT_CHARS = 1 << 22
# the most text a window asks for at once beyond one block (an 8 MB block is more than this)
_GROW_CHARS = 1 << 21


class Window:
    """The part of a file's text the parser is looking at, and where it lies in the file."""

    def __init__(self, text: str, blocks: Iterator[str] | None = None):
        self.text = text
        self.blocks = blocks
        self.eof = blocks is None
        self.dropped_chars = 0  # characters of the file before text[0]
        self.dropped_lines = 0  # newlines among them
        self.col0 = 0  # characters between the last of those newlines and text[0]
        # newlines in text[:upto] and the last of them (-1: none), kept for ``message``: errors come
        # in order, so each looks only at the text after the one before (a minified array is one
        # line of megabytes, scanned again for every broken element otherwise)
        self._lines_upto = (0, 0, -1)

    def extend(self) -> bool:
        """Append the next block, and more until as much text as the window holds (up to
        ``_GROW_CHARS``) was added: an element that spans many small blocks is then parsed again
        a logarithmic number of times, not once per block. False at the end of the file."""
        if self.eof:
            return False
        want = max(1, min(len(self.text), _GROW_CHARS))
        added: list[str] = []
        size = 0
        for block in self.blocks:
            if block:
                added.append(block)
                size += len(block)
                if size >= want:
                    break
        else:
            self.eof = True
        if not added:
            return False
        self.text += "".join(added)
        return True

    def drop(self, upto: int) -> int:
        """Forget the text before ``upto`` (positions shift down by the returned count)."""
        gone = self.text[:upto]
        nl = gone.count("\n")
        self.col0 = upto - gone.rfind("\n") - 1 if nl else self.col0 + upto
        self.dropped_lines += nl
        self.dropped_chars += upto
        self.text = self.text[upto:]
        self._lines_upto = (0, 0, -1)
        return upto

    def message(self, exc: json.JSONDecodeError) -> str:
        """``str(exc)`` as a parser of the whole file would word it (line, column, char from its start)."""
        pos = exc.pos
        upto, newlines, last_nl = self._lines_upto if self._lines_upto[0] <= pos else (0, 0, -1)
        newlines += self.text.count("\n", upto, pos)
        last_nl = max(last_nl, self.text.rfind("\n", upto, pos))
        self._lines_upto = (pos, newlines, last_nl)
        lineno = self.dropped_lines + newlines + 1
        colno = pos - last_nl if last_nl >= 0 else self.col0 + pos + 1
        return f"{exc.msg}: line {lineno} column {colno} (char {self.dropped_chars + pos})"


def _cut_by_window(win: Window, exc: Exception) -> bool:
    """Did the element fail only because the window ends inside it?"""
    if win.eof or not isinstance(exc, json.JSONDecodeError):
        return False
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(win.text) - 64


def iter_array(
    win: Window,
    start: int,
    bad_lines: dict[int, str],
    strict_keys: bool = False,
    nested: bool = False,
    piece_rows: int | None = None,
) -> Iterator[Parsed]:
    """Parse the array whose ``[`` is at ``start``; yields the values in pieces of ``piece_rows``
    (one piece when None). ``nested``: the array sits inside a top-level object; stop at its
    closing ``]``. Notes are shared by all pieces (one list).

    Reads better whole: one scanner loop over the text whose position, line count and window
    refills every branch shares; split into functions, each would pass and return all of them,
    and the loop runs once per element of arrays of millions."""
    notes: list[str] = []
    parsed = Parsed(format="JSON array", notes=notes)
    # Read whole, the caller parses again with strict keys when the text holds a key more often
    # than its records do (``json_recovery.may_repeat_keys``); read in blocks, each element is
    # checked as it is read.
    check_keys = not strict_keys and not win.eof
    scan = STRICT_DECODER.scan_once if strict_keys else SCAN
    ws = JSON_WS.match
    text = win.text
    n = len(text)
    pos = start + 1
    line = win.dropped_lines + text.count("\n", 0, pos) + 1
    last = pos
    index = 0

    def grow() -> bool:
        nonlocal text, n
        grew = win.extend()
        text, n = win.text, len(win.text)
        return grew

    def skip_ws(p: int) -> int:
        if p < n and text[p] not in " \t\n\r":
            return p  # (a minified array: no whitespace between elements, no regex call)
        while True:
            q = ws(text, p).end()
            if q < n or not grow():
                return q

    def error_end(p: int) -> int:
        while True:
            m = _RESYNC.search(text, p + 1)
            if m:
                return m.end()
            if not grow():
                return n

    def reject(reason: str) -> int:
        nonlocal index
        err_end = error_end(pos)
        parsed.errors.append((line, index, reason, clip_raw(text[pos:err_end].rstrip(", \t\r\n"))))
        index += 1
        return err_end

    while True:
        if not win.eof and last > _COMPACT_CHARS:
            shift = win.drop(last)
            text, n = win.text, len(win.text)
            pos, last = pos - shift, last - shift
        pos = skip_ws(pos)
        if pos >= n:
            notes.append("array not closed (truncated file?)")
            if parsed.errors and parsed.errors[-1][1] == index - 1 and not parsed.errors[-1][3].endswith("}"):
                # the last element is the one cut short: one row, not two
                e_line, e_index, e_reason, e_raw = parsed.errors[-1]
                parsed.errors[-1] = (
                    e_line,
                    e_index,
                    f"truncated JSON (the file ends inside this element): {e_reason}",
                    e_raw,
                )
            else:
                line += text.count("\n", last, pos)
                parsed.errors.append(
                    (
                        line,
                        index,
                        "truncated JSON: the array is not closed with ']' (rows after this point may be missing)",
                        "",
                    )
                )
            break
        ch = text[pos]
        if ch == "]":
            if nested:
                break
            tail = skip_ws(pos + 1)
            if tail != n and text[tail] == "[":
                notes.append("several JSON arrays one after another: read as one")
                pos = tail + 1
                continue
            if tail != n:
                while grow():
                    pass
                line += text.count("\n", last, tail)
                parsed.errors.append(
                    (line, index, "invalid JSON: extra text after the closing ']'", clip_raw(text[tail:]))
                )
            break
        line += text.count("\n", last, pos)
        last = pos
        count = text.count
        try:
            value, end = scan(text, pos)
            if end >= n and grow():
                continue  # a value that ends where the window does may go on in the next block
            if check_keys and (
                count(_Q_INSTRUCTION, pos, end) > 1 or count(_Q_INPUT, pos, end) > 1 or count(_Q_OUTPUT, pos, end) > 1
            ):
                value = STRICT_DECODER.scan_once(text, pos)[0]  # a key given twice is caught
        except StopIteration as stop:
            # no value where one should be: at the window's end (even inside a nested value) that
            # may only be where this block stops
            if not win.eof and isinstance(stop.value, int) and stop.value >= n - 64:
                grow()
                continue
            pos = reject(bad_lines.get(line) or _element_reason(win, text, pos))
            continue
        except (ValueError, RecursionError) as exc:
            if _cut_by_window(win, exc):
                grow()
                continue
            pos = reject(
                bad_lines.get(line)
                or (
                    f"invalid JSON: {win.message(exc)}"
                    if isinstance(exc, json.JSONDecodeError)
                    else f"invalid JSON: {exc}"
                    if isinstance(exc, ValueError)
                    else "invalid JSON: nested too deeply"
                )
            )
            continue
        parsed.lines.append(line)
        parsed.indexes.append(index)
        parsed.values.append(value)
        index += 1
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            nxt = skip_ws(pos + 1)
            if nxt < n and text[nxt] == "]":
                notes.append("trailing comma before ']' tolerated")
            pos = nxt
        elif pos < n and text[pos] not in "]":
            # a missing comma between elements: carry on from here and let the next element tell
            notes.append(f"missing ',' after the element at line {line} tolerated")
        if piece_rows and len(parsed.values) >= piece_rows:
            yield parsed
            parsed = Parsed(format="JSON array", notes=notes)
    yield parsed


def _element_reason(win: Window, text: str, pos: int) -> str:
    try:
        _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {win.message(exc)}"
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    return "invalid JSON value"
