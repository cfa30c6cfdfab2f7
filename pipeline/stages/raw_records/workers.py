"""Raw files read by worker processes, one file each at a time, so that ``raw_records`` uses
every core on a large corpus (parsing JSON holds Python's lock: threads would not help).

Each worker writes its file's rows to part files in the stage's temporary folder; the stage
appends them in file order, so the output is the same as reading the files one after another.
Workers start with ``spawn`` (safe under Dagster's threads); each holds one block of one file.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from pipeline.core.chunks import ChunkWriter, iter_batches
from pipeline.core.records import empty_records, rejects_frame
from pipeline.stages.raw_records.blocks import iter_file
from pipeline.stages.raw_records.rows import FileSummary

# below this many bytes of input, starting worker processes costs more than it saves
PARALLEL_BYTES = 64 << 20


def worker_count(files: list[Path], workers: int | None) -> int:
    if workers is not None:
        return max(1, min(workers, len(files)))
    total = 0
    for path in files:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return min(os.cpu_count() or 1, len(files)) if total > PARALLEL_BYTES else 1


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM), in MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _read_one(path: str, rel: str, prefix: str, stream_over: int, block_bytes: int, chunk_rows: int) -> dict:
    """In a worker: one file's rows to ``<prefix>.kept.arrow`` and ``<prefix>.rejected.arrow``."""
    summary: FileSummary | None = None
    notes: Counter[str] = Counter()
    with (
        ChunkWriter(f"{prefix}.kept.arrow", "arrow", empty=empty_records(), chunk_rows=chunk_rows) as kept,
        ChunkWriter(f"{prefix}.rejected.arrow", "arrow", empty=rejects_frame(), chunk_rows=chunk_rows) as rejected,
    ):
        for result in iter_file(Path(path), rel, stream_over, block_bytes):
            summary = result.summary or summary
            notes.update(result.notes)
            if result.rejected:
                rejected.write(rejects_frame(result.rejected))
            if result.table is not None:
                kept.write(result.table)
    return {"summary": summary, "notes": notes, "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}


def read_in_workers(
    raw_dir: Path, files: list[Path], tmp: Path, workers: int, stream_over: int, block_bytes: int, chunk_rows: int
) -> Iterator[tuple[dict, Path, Path]]:
    """Each file's ``(summary and notes, kept part, rejected part)``, in file order; the caller
    appends the parts and removes them."""
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = []
        for i, path in enumerate(files):
            prefix = tmp / f"part-{i:06d}"
            futures.append(
                (
                    pool.submit(
                        _read_one,
                        str(path),
                        path.relative_to(raw_dir).as_posix(),
                        str(prefix),
                        stream_over,
                        block_bytes,
                        chunk_rows,
                    ),
                    prefix,
                )
            )
        try:
            for future, prefix in futures:
                yield future.result(), Path(f"{prefix}.kept.arrow"), Path(f"{prefix}.rejected.arrow")
        finally:
            for future, _prefix in futures:
                future.cancel()


def append_part(writer: ChunkWriter, part: Path, chunk_rows: int) -> None:
    for table in iter_batches(part, chunk_rows):
        writer.write(table)
    part.unlink()
