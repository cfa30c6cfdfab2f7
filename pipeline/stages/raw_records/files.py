"""Which files the raw folder holds (``discover_files``) and a fingerprint of their contents
(``raw_fingerprint``: what the sensor watches)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.core.fingerprint import sha256_file

SUFFIXES = (".json", ".jsonl")
EMPTY = "empty"


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


def raw_fingerprint(raw_dir: str | os.PathLike) -> str:
    raw = Path(raw_dir)
    if not raw.is_dir():
        return EMPTY
    files, _refused, _ignored = discover_files(raw)
    if not files:
        return EMPTY
    h = hashlib.sha256()
    for path in sorted(files, key=lambda q: q.relative_to(raw).as_posix()):
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            return "unreadable"  # vanished or being replaced: look again on the next tick
        except OSError as exc:
            # unreadable for good (permissions, I/O error): part of the fingerprint, so it neither
            # blocks the sensor nor hides the other files; raw_records rejects it with the reason
            digest = f"unreadable:{exc.errno}"
        h.update(f"{path.relative_to(raw).as_posix()}\0{digest}\n".encode())
    return h.hexdigest()
