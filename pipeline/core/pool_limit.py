"""A Dagster pool's limit, held by locks as well: lock files on one machine, advisory locks on a
shared PostgreSQL instance.

Dagster (1.13) claims a pool slot with a read and then a write: ``SELECT ... FOR UPDATE`` of a free
slot, then ``UPDATE ... WHERE id = ?`` without checking the slot is still free. SQLite ignores
``FOR UPDATE`` and dagster-postgres runs both in autocommit mode, so two runs that reach a pooled
step in the same instant can both get the one slot: CI saw two trainings overlap that way (SQLite).
``pool_slot`` therefore also takes one of ``limit`` locks, released when the holder's process dies:

- SQLite instance (one machine): ``flock`` files under ``$DAGSTER_HOME/pool_slots/<pool>/``
  (``pipeline.core.atomic.file_semaphore``);
- PostgreSQL instance (a team's, several machines): session advisory locks on the instance's own
  database (``pg_try_advisory_lock(pool key, slot)`` on a connection held while training), so the
  limit holds across every machine that shares the instance. A holder whose connection to the
  server drops mid-training loses its lock with the session; a thread notices within
  ``LOCK_CHECK_S`` and calls ``on_lost``: ``lora_adapter`` then stops its training at a checkpoint
  and fails saying why, and the next run resumes from it.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.atomic import file_semaphore


def pool_limit(instance, pool: str) -> int | None:
    """The pool's limit as the instance reports it (its default limit until the slots exist)."""
    try:
        return instance.event_log_storage.get_concurrency_info(pool).limit
    except Exception:  # a storage without pools: no limit to hold
        return None


def instance_postgres_url(instance) -> str | None:
    """The instance's PostgreSQL URL (as dagster-postgres connects: a password, if any, from libpq's
    PGPASSWORD or ~/.pgpass), or None for any other storage."""
    url = getattr(instance.event_log_storage, "postgres_url", None)
    return url if isinstance(url, str) and url.startswith("postgres") else None


def advisory_key(pool: str) -> int:
    """The advisory lock class of a pool: a stable 31-bit number from its name."""
    return zlib.crc32(f"medtune pool {pool}".encode()) & 0x7FFFFFFF


# one training step at a time on this machine, whatever launched it (pipeline/dagster.yaml sets the limits)
TRAINING_POOL = "medtune_training"
# evaluation_report and merged_model one at a time: side by side on a few cores each runs several times slower
INFERENCE_POOL = "medtune_inference"
LOCK_CHECK_S = 15.0  # how often a held advisory lock's connection is checked: a lost lock is noticed within this


@contextlib.contextmanager
def _watch(conn, on_lost, check_s: float) -> Iterator[None]:
    """While the body runs, ask the server every ``check_s`` whether the connection (and with it the
    session's advisory lock) is still there; ``on_lost(reason)`` once if not."""
    import threading

    import sqlalchemy as sa

    done = threading.Event()

    def watch():
        while not done.wait(check_s):
            try:
                conn.execute(sa.text("SELECT 1")).scalar()
            except Exception as exc:
                on_lost(f"the connection holding it was lost ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                return

    thread = threading.Thread(target=watch, name="advisory-lock-watch", daemon=True)
    if on_lost is not None:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread.is_alive():
            thread.join()


@contextlib.contextmanager
def advisory_semaphore(
    url: str, key: int, slots: int, on_wait=None, poll_s: float = 0.5, on_lost=None, check_s: float | None = None
) -> Iterator[int]:
    """At most ``slots`` holders at once among every client of the PostgreSQL server at ``url``:
    session advisory locks ``(key, 0..slots-1)``; yields the slot's number. The server drops a
    lock when its connection ends, so a dead holder frees its slot; a holder whose connection drops
    loses its slot the same way, and ``on_lost(reason)`` is called within ``check_s``."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    if slots < 1:
        raise ValueError(f"a semaphore needs at least one slot, not {slots}")
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            waited = False
            while True:
                for i in range(slots):
                    if conn.execute(sa.text("SELECT pg_try_advisory_lock(:k, :i)"), {"k": key, "i": i}).scalar():
                        try:
                            with _watch(conn, on_lost, check_s or LOCK_CHECK_S):
                                yield i
                        finally:
                            with contextlib.suppress(Exception):  # a lost connection has dropped it already
                                conn.execute(sa.text("SELECT pg_advisory_unlock(:k, :i)"), {"k": key, "i": i})
                        return
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                time.sleep(poll_s)
    finally:
        engine.dispose()


@contextlib.contextmanager
def pool_slot(instance, pool: str, log, on_lost=None) -> Iterator[int | None]:
    """Hold one of the pool's slots; yields its number (None: the pool has no limit). On a
    PostgreSQL instance ``on_lost(reason)`` is called if the slot's advisory lock is lost."""
    limit = pool_limit(instance, pool)
    if not limit:
        yield None
        return
    url = instance_postgres_url(instance)
    where = "among the instance's machines (PostgreSQL advisory lock)" if url else "on this machine"

    def on_wait():
        log(f"all {limit} {pool} slot(s) {where} are taken: waiting")

    if url:
        held = advisory_semaphore(url, advisory_key(pool), limit, on_wait=on_wait, on_lost=on_lost)
    else:
        held = file_semaphore(Path(instance.root_directory) / "pool_slots" / pool, limit, on_wait=on_wait)
    with held as slot:
        log(f"holding {pool} slot {slot + 1} of {limit} {where}")
        try:
            yield slot
        finally:
            log(f"released {pool} slot {slot + 1} of {limit}")
