"""Which files the raw folder holds (``discover_files``) and a fingerprint of their contents
(``raw_fingerprint``: what the sensor watches, cached per file by its stat)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
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


# a digest is trusted from the cache only if the file's stat is unchanged and the file was last
# written well before it was hashed (a write in the same timestamp tick would not move its mtime)
RACY_S = 2.0


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def raw_fingerprint(raw_dir: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """One digest over the raw files' paths (relative to ``raw_dir``) and sha256 of their contents.

    With ``cache`` (a JSON file), a file whose size, mtime, ctime, inode and device are those it had
    when it was last hashed is not read again: a tick over unchanged data only stats the files."""
    raw = Path(raw_dir)
    if not raw.is_dir():
        return EMPTY
    files, _refused, _ignored = discover_files(raw)
    if not files:
        return EMPTY
    known = _load_cache(cache)
    fresh: dict[str, dict] = {}
    h = hashlib.sha256()
    for path in sorted(files, key=lambda q: q.relative_to(raw).as_posix()):
        rel = path.relative_to(raw).as_posix()
        try:
            st = path.stat()
            entry = known.get(rel)
            if (
                entry
                and entry.get("stat") == _stat_key(st)
                and entry.get("hashed_ns", 0) - st.st_mtime_ns > RACY_S * 1e9
            ):
                digest = entry["sha256"]
                fresh[rel] = entry
            else:
                hashed_ns = time.time_ns()
                digest = sha256_file(path)
                if _stat_key(path.stat()) == _stat_key(st):  # not written while it was read
                    fresh[rel] = {"stat": _stat_key(st), "sha256": digest, "hashed_ns": hashed_ns}
        except FileNotFoundError:
            return "unreadable"  # vanished or being replaced: look again on the next tick
        except OSError as exc:
            # unreadable for good (permissions, I/O error): part of the fingerprint, so it neither
            # blocks the sensor nor hides the other files; raw_records rejects it with the reason
            digest = f"unreadable:{exc.errno}"
        h.update(f"{rel}\0{digest}\n".encode())
    if cache is not None and fresh != known:
        _save_cache(cache, fresh)
    return h.hexdigest()


def _load_cache(cache: str | os.PathLike | None) -> dict[str, dict]:
    if cache is None:
        return {}
    try:
        data = json.loads(Path(cache).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: str | os.PathLike, entries: dict[str, dict]) -> None:
    from pipeline.core.atomic import OutputWriteError, write_bytes_atomic

    with contextlib.suppress(OSError, OutputWriteError):  # a cache: without it the next tick reads the files again
        write_bytes_atomic(cache, json.dumps(entries, ensure_ascii=False).encode())
