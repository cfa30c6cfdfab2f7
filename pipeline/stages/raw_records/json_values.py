"""The JSON pieces the raw-data readers share: the whitespace pattern, the fast scanner, a decoder
that marks objects with a repeated key, and ``Parsed``, what reading one file gives."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

JSON_WS = re.compile(r"[ \t\n\r]*")
DECODER = json.JSONDecoder()
SCAN = DECODER.scan_once


@dataclass
class Parsed:
    """Parsed JSON values of one file with their positions (1-based line, 0-based index)."""

    lines: list[int] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    source_lines: list[str] | None = None  # JSON Lines: the file's lines, for rejected rows' text
    line_base: int = 0  # lines of the file before ``source_lines[0]`` (a file read in blocks)
    errors: list[tuple[int, int, str, str]] = field(default_factory=list)  # (line, index, reason, raw)
    format: str = ""
    blank_lines: int = 0
    notes: list[str] = field(default_factory=list)


DUPLICATE_KEYS = "\x00duplicate keys"


def pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    dups: list[str] = []
    for key, value in pairs:
        if key in out and out[key] != value and key not in dups:
            dups.append(key)
        out[key] = value
    if dups:
        out[DUPLICATE_KEYS] = dups
    return out


STRICT_DECODER = json.JSONDecoder(object_pairs_hook=pairs_hook)
