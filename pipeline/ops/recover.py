"""Clean up after runs whose process died: ``python -m pipeline.ops.recover``.

A Dagster run whose process is killed outright (SIGKILL, the OOM killer, a power cut) never
records its end: it stays STARTED in the instance's storage and keeps the slot it claimed in the
pool ``medtune_training``, so the next training waits for that slot forever. This module finds
such runs (their process, known from their events, is gone), marks them failed and frees their
slots. ``make run`` and ``make ui`` call it before they start; ``raw_data_sensor`` calls it on every
tick, so a run killed while ``make ui`` is up does not block the next one either.

The training itself resumes from its latest checkpoint when the asset is materialized again.

On an instance that several machines share (PostgreSQL, ``MEDTUNE_POSTGRES_URL``) a pid means
something only on the host that ran it: there a run is judged only by the host named in its
``medtune/host`` tag (set at launch by ``pipeline/ops/launcher.py``, or by the ``data_root``
resource as an in-process run's first step starts), and runs of other hosts are left alone.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.atomic import pid_exists
from pipeline.core.stores import RUN_HOST_TAG

# a run without any event naming its process is left alone for this long (it may be starting)
STARTING_GRACE_S = 600


@dataclass
class Recovered:
    run_id: str
    pid: int | None
    slots_freed: list[str]


def _alive(pid: int) -> bool:
    """The process exists and is a Dagster/Python process (a reused pid after a reboot is not)."""
    if not pid_exists(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True
        return "dagster" in text or "python" in text or "pytest" in text
    return True


def _run_pid(instance, run_id: str) -> int | None:
    """The pid of the process that runs the run (the one that logged RUN_START)."""
    from dagster import DagsterEventType

    for of_type in (DagsterEventType.RUN_START, DagsterEventType.ENGINE_EVENT):
        pids = [
            e.dagster_event.pid
            for e in instance.all_logs(run_id, of_type=of_type)
            if e.dagster_event is not None and getattr(e.dagster_event, "pid", None)
        ]
        if pids:
            return pids[0]
    return None


def recover_dead_runs(instance, log=print) -> list[Recovered]:
    """Mark runs whose process is gone as failed and free every pool slot they hold."""
    from dagster import DagsterRunStatus, RunsFilter

    live = (DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.CANCELING)
    recovered: list[Recovered] = []
    shared = not _local_storage(instance)
    for run in instance.get_runs(filters=RunsFilter(statuses=list(live))):
        if shared and run.tags.get(RUN_HOST_TAG) != socket.gethostname():
            continue  # another machine's run (or not yet known where): its pid means nothing here
        pid = _run_pid(instance, run.run_id)
        if pid is None:
            record = instance.get_run_record_by_id(run.run_id)
            started = record.create_timestamp.timestamp() if record and record.create_timestamp else time.time()
            if time.time() - started < STARTING_GRACE_S:
                continue
        elif pid == os.getpid() or _alive(pid):
            continue
        slots = [
            c.step_key
            for pool in _pools(instance)
            for c in instance.event_log_storage.get_concurrency_info(pool).claimed_slots
            if c.run_id == run.run_id
        ]
        instance.report_run_failed(
            run,
            message=f"the run's process (pid {pid}) is gone (killed?); marked failed by pipeline.ops.recover"
            + (f", its pool slots freed ({', '.join(slots)})" if slots else ""),
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(Recovered(run.run_id, pid, slots))
        log(
            f"recovered run {run.run_id}: its process (pid {pid}) is gone; marked failed"
            + (f", freed pool slots of {', '.join(slots)}" if slots else "")
        )
    # slots still held by runs that ended (a crash between the end and the release)
    ended = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    for pool in _pools(instance):
        for claim in instance.event_log_storage.get_concurrency_info(pool).claimed_slots:
            run = instance.get_run_by_id(claim.run_id)
            if run is None or run.status in ended:
                instance.event_log_storage.free_concurrency_slots_for_run(claim.run_id)
                log(f"freed the {pool} slot still held by ended run {claim.run_id}")
    return recovered


def _local_storage(instance) -> bool:
    """Runs kept in SQLite files or in memory: one machine's, by construction."""
    return type(instance.run_storage).__name__.startswith(("Sqlite", "InMemory"))


def _pools(instance) -> list[str]:
    try:
        return sorted(instance.event_log_storage.get_concurrency_keys())
    except Exception:  # storage without pools
        return []


def main() -> int:
    from dagster import DagsterInstance

    from pipeline.ops.run_data import prune_run_data
    from resources.data_root import DataRoot, default_data_dir

    if not os.environ.get("DAGSTER_HOME"):
        print("pipeline.ops.recover: DAGSTER_HOME is not set; nothing to recover", file=sys.stderr)
        return 0
    instance = DagsterInstance.get()
    try:
        found = recover_dead_runs(instance)
        prune_run_data(instance, DataRoot(path=default_data_dir()).runs_dir)
    finally:
        instance.dispose()
    if not found:
        print("pipeline.ops.recover: no dead runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
