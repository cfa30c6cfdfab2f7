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

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.chunks import CHUNK_ROWS
from pipeline.core.records import StagedRows, StageResult, empty_records, in_memory, rejects_frame, stage_output
from pipeline.stages.raw_records.blocks import BLOCK_BYTES, STREAM_BYTES, iter_file
from pipeline.stages.raw_records.decoding import FileRejected, decode_lines
from pipeline.stages.raw_records.files import EMPTY, SUFFIXES, discover_files, raw_fingerprint
from pipeline.stages.raw_records.json_recovery import parse_text
from pipeline.stages.raw_records.json_values import Parsed
from pipeline.stages.raw_records.rows import STAGE, FileResult, FileSummary, ingest_file
from pipeline.stages.raw_records.workers import append_part, read_in_workers, worker_count

__all__ = [
    "EMPTY",
    "STAGE",
    "SUFFIXES",
    "FileRejected",
    "FileResult",
    "FileSummary",
    "Parsed",
    "decode_lines",
    "discover_files",
    "ingest",
    "ingest_file",
    "ingest_to",
    "parse_text",
    "raw_fingerprint",
]


def _results(
    raw_dir: Path, discovered, stream_over: int | None = None, block_bytes: int = BLOCK_BYTES
) -> Iterator[FileResult]:
    """Every file's result in the order rejected rows are listed: files refused by name first.
    With ``stream_over``, files larger than that are read in blocks (several results each)."""
    files, refused, _ignored = discovered
    for rel, reason in refused:
        summary = FileSummary(source_file=rel, error=reason, rows_read=1, rows_rejected=1)
        yield FileResult(
            None,
            [
                {
                    "source_file": rel,
                    "source_line": None,
                    "source_index": None,
                    "stage": STAGE,
                    "reason": f"file rejected: {reason}",
                    "raw": "",
                }
            ],
            summary,
        )
    for path in files:
        rel = path.relative_to(raw_dir).as_posix()
        if stream_over is None:
            yield ingest_file(path, rel)
        else:
            yield from iter_file(path, rel, stream_over, block_bytes)


def _discover(raw_dir: Path):
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder {raw_dir} does not exist; put *.json or *.jsonl files there")
    return discover_files(raw_dir)


def _stats(discovered, summaries: list[FileSummary], notes: Counter, n_kept: int, n_rejected: int) -> dict:
    files, _refused, ignored = discovered
    summaries = sorted(summaries, key=lambda s: s.source_file)
    return {
        "files_read": len(files),
        "files_rejected": sum(1 for s in summaries if s.error),
        "files_ignored": ignored,
        "rows_read": n_kept + n_rejected,
        "rows_kept": n_kept,
        "rows_rejected": n_rejected,
        "files": [s.__dict__ for s in summaries],
        "notes": dict(notes),
    }


def ingest(raw_dir: str | os.PathLike) -> StageResult:
    """Every raw file under ``raw_dir`` as one table of rows plus the rows rejected, in memory: the
    asset's own :func:`ingest_to` into a temporary folder, read back (one code path)."""
    with in_memory(lambda folder: ingest_to(raw_dir, folder)) as result:
        return result


def ingest_to(
    raw_dir: str | os.PathLike,
    folder: str | os.PathLike,
    chunk_rows: int = CHUNK_ROWS,
    stream_over: int = STREAM_BYTES,
    block_bytes: int = BLOCK_BYTES,
    workers: int | None = None,
    log=None,
) -> StagedRows:
    """:func:`ingest`, streamed: rows go to ``folder`` (``kept.arrow``, ``rejected.arrow``,
    ``stats.json``) as they are read; files over ``stream_over`` bytes are read in blocks
    (``blocks.py``), so memory holds a block's rows, not a file's. On a corpus over 64 MB the
    files are read by one worker process per core (``workers.py``; ``workers`` sets how many).
    ``log``: a progress line every few seconds (rows read, rows/s)."""
    from pipeline.core.progress import Progress

    raw_dir = Path(raw_dir)
    discovered = _discover(raw_dir)
    files, refused, _ignored = discovered
    n_workers = worker_count(files, workers)
    summaries: list[FileSummary] = []
    notes: Counter[str] = Counter()
    worker_rss: dict[int, float] = {}  # each worker process's peak
    progress = Progress(log, f"raw_records: {len(files)} file(s)", every=5.0)
    with stage_output(folder, empty_records(), chunk_rows) as out:
        serial = (
            _results(raw_dir, discovered, stream_over, block_bytes)
            if n_workers == 1
            else _results(raw_dir, (files[:0], refused, _ignored))
        )  # the refused files only
        for result in serial:
            if result.summary is not None:
                summaries.append(result.summary)
            notes.update(result.notes)
            if result.rejected:
                out.rejected.write(rejects_frame(result.rejected))
            if result.table is not None:
                out.kept.write(result.table)
            del result
            progress(out.kept.rows + out.rejected.rows)
        if n_workers > 1:
            for done, kept_part, rejected_part in read_in_workers(
                raw_dir, files, out.tmp, n_workers, stream_over, block_bytes, chunk_rows
            ):
                summaries.append(done["summary"])
                notes.update(done["notes"])
                worker_rss[done["pid"]] = max(worker_rss.get(done["pid"], 0), round(done["peak_rss_mb"]))
                append_part(out.rejected, rejected_part, chunk_rows)
                append_part(out.kept, kept_part, chunk_rows)
                progress(out.kept.rows + out.rejected.rows)
        progress.total = out.kept.rows + out.rejected.rows
        progress(progress.total)
        out.stats = _stats(discovered, summaries, notes, out.kept.rows, out.rejected.rows)
        out.stats["workers"] = n_workers
        out.stats["workers_peak_rss_mb"] = list(worker_rss.values())
    return StagedRows(str(folder), out.stats)
