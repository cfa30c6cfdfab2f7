"""A Dagster pool's limit, held on this machine by lock files as well.

Dagster (1.13) claims a pool slot with a read and then a write: ``SELECT ... FOR UPDATE`` of a free
slot, then ``UPDATE ... WHERE id = ?`` without checking the slot is still free. SQLite ignores
``FOR UPDATE`` and dagster-postgres runs both in autocommit mode, so two runs that reach a pooled
step in the same instant can both get the one slot: CI saw two trainings overlap that way (SQLite).
``machine_slot`` takes one of the pool's ``limit`` lock files (``pipeline.core.atomic.file_semaphore``)
under the instance's home, so at most ``limit`` holders run at once on this machine, whatever the
storage did. Across machines sharing one instance the window stays Dagster's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.atomic import file_semaphore


def pool_limit(instance, pool: str) -> int | None:
    """The pool's limit as the instance reports it (its default limit until the slots exist)."""
    try:
        return instance.event_log_storage.get_concurrency_info(pool).limit
    except Exception:  # a storage without pools: no limit to hold
        return None


@contextlib.contextmanager
def machine_slot(instance, pool: str, log) -> Iterator[int | None]:
    """Hold one of the pool's slots on this machine; yields its number (None: the pool has no limit)."""
    limit = pool_limit(instance, pool)
    if not limit:
        yield None
        return
    folder = Path(instance.root_directory) / "pool_slots" / pool
    with file_semaphore(folder, limit, on_wait=lambda: log(f"all {limit} {pool} slot(s) of this machine are taken: waiting")) as slot:
        log(f"holding {pool} slot {slot + 1} of {limit} on this machine")
        try:
            yield slot
        finally:
            log(f"released {pool} slot {slot + 1} of {limit}")
