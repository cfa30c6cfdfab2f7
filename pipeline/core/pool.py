"""Chunks of a stage's rows handed to worker processes, one core each, results back in order.

The work on a chunk (Great Expectations, normalising and hashing) holds Python's lock, so threads
would not help; a worker reads its chunk from the stage's Arrow file itself (only the batch
number travels) and sends back a small result (reasons, keys), never the rows. Workers start
with ``spawn`` (safe under Dagster's threads) and only for inputs large enough to repay their
start-up (a few seconds of imports).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.core.chunks import to_frame

# rows below which one process does the work: starting workers (a few seconds of imports each)
# made 1M rows slower (validation 6.7 s against 4.5 s) and 10M rows faster
PARALLEL_ROWS = 2_000_000


_IN_WORKER = False  # set in each worker process: the pool already gives every core a process


def _mark_worker() -> None:
    global _IN_WORKER
    _IN_WORKER = True
    pa.set_cpu_count(1)  # nor Arrow's own thread pool


def cores_here() -> int:
    """Cores this process may keep busy with threads: one inside a pool worker, else all."""
    return 1 if _IN_WORKER else (os.cpu_count() or 1)


def workers_for(rows: int, workers: int | None = None) -> int:
    if workers is not None:
        return max(1, workers)
    return (os.cpu_count() or 1) if rows >= PARALLEL_ROWS else 1


def read_batch(path: str | os.PathLike, index: int):
    """Batch ``index`` of an Arrow IPC file, as pandas."""
    with pa.OSFile(str(path)) as source:
        return to_frame(pa.Table.from_batches([ipc.open_file(source).get_batch(index)]))


def batch_count(path: str | os.PathLike) -> int:
    with pa.OSFile(str(path)) as source:
        return ipc.open_file(source).num_record_batches


def map_batches(path: Path, fn: Callable[..., Any], args: tuple, workers: int) -> Iterator[Any]:
    """``fn(path, i, *args)`` for every batch ``i`` of ``path``, in order; at most two tasks per
    worker in flight, so results never pile up."""
    n = batch_count(path)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_mark_worker) as pool:
        pending = []
        nxt = 0
        try:
            for _ in range(n):
                while nxt < n and len(pending) < 2 * workers:
                    pending.append(pool.submit(fn, str(path), nxt, *args))
                    nxt += 1
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()
