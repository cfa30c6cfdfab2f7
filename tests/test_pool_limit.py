"""The training pool's limit held by locks as well as by Dagster's slot claim, which two runs can win
in the same instant (pipeline/core/pool_limit.py): lock files on one machine (SQLite instance),
PostgreSQL advisory locks across the machines that share a PostgreSQL instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.core.atomic import file_semaphore
from pipeline.core.pool_limit import pool_limit, pool_slot
from pipeline.ops.instance import ensure_dagster_home

pytestmark = pytest.mark.slow  # concurrent runs in subprocesses: make test, not make test-fast

PROJECT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import json, os, sys, time
    from pipeline.core.atomic import file_semaphore
    folder, slots, hold, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    while len(sys.argv) > 5 and not os.path.exists(sys.argv[5]):  # all start together
        time.sleep(0.005)
    with file_semaphore(folder, slots) as slot:
        start = time.time()
        time.sleep(hold)
        end = time.time()
    with open(out, "w") as fh:
        json.dump({"slot": slot, "start": start, "end": end}, fh)
""")


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.parametrize("slots", [1, 2])
def test_a_file_semaphore_admits_at_most_its_slots_across_processes(tmp_path, slots):
    """Five processes started together, each holding a slot for 0.4 s: never more than ``slots``
    at once, and the semaphore does not serialise more than it must."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    outs = [tmp_path / f"holder-{i}.json" for i in range(5)]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path / "slots"), str(slots), "0.4", str(out), str(go)], env=env
        )
        for out in outs
    ]
    time.sleep(2.0)  # every holder is up and polling
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * 5
    held = [json.loads(out.read_text()) for out in outs]
    spans = [(h["start"], h["end"]) for h in held]
    assert _most_at_once(spans) == slots, spans
    assert {h["slot"] for h in held} == set(range(slots))
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == [f"slot-{i}.lock" for i in range(slots)]


def test_a_killed_holder_frees_its_slot_and_a_waiter_says_it_waits(tmp_path):
    folder = tmp_path / "slots"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "1", "600", str(tmp_path / "never.json")],
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )
    deadline = time.monotonic() + 60
    while not (folder / "slot-0.lock").exists():  # the holder has opened its slot file; give it the lock
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    waits = []
    killer = None
    try:
        import threading

        killer = threading.Timer(1.0, lambda: holder.send_signal(signal.SIGKILL))
        killer.start()
        start = time.monotonic()
        with file_semaphore(folder, 1, on_wait=lambda: waits.append(time.monotonic() - start)) as slot:
            waited = time.monotonic() - start
    finally:
        if killer:
            killer.cancel()
        holder.kill()
        holder.wait()
    assert slot == 0 and len(waits) == 1 and waits[0] < 0.5  # told at once that it waits, once
    assert 0.9 < waited < 30  # got the slot when the kernel dropped the dead holder's lock
    assert not (tmp_path / "never.json").exists()


def test_a_semaphore_needs_a_slot(tmp_path):
    with pytest.raises(ValueError, match="at least one slot"):
        with file_semaphore(tmp_path, 0):
            pass


def test_a_pool_slot_on_sqlite_is_a_lock_file_under_the_instance_home(tmp_path):
    """The project's instance settings (pipeline/dagster.yaml: the training pool's limit 1): the slot
    files live under the instance's home, the log says what was held, waited for and released."""
    from dagster import DagsterInstance

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT / "pipeline" / "dagster.yaml").read_text())
    instance = DagsterInstance.from_config(str(home))
    try:
        assert pool_limit(instance, "medtune_training") == 1
        said = []
        with pool_slot(instance, "medtune_training", said.append) as slot:
            assert slot == 0
            folder = home / "pool_slots" / "medtune_training"
            # another process asking for the pool's one slot now waits
            probe = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(f"""
                import fcntl
                fh = open({str(folder / "slot-0.lock")!r}, "a")
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print("taken")
            """),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert probe.stdout.strip() == "taken", probe.stderr
        assert said == ["holding medtune_training slot 1 of 1 on this machine", "released medtune_training slot 1 of 1"]
    finally:
        instance.dispose()


def test_a_pool_without_a_limit_takes_no_slot(tmp_path):
    from dagster import DagsterInstance

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = DagsterInstance.from_config(str(home))
    try:
        said = []
        with pool_slot(instance, "medtune_training", said.append) as slot:
            assert slot is None
        assert said == [] and not (home / "pool_slots").exists()
    finally:
        instance.dispose()


PG_HOLDER = textwrap.dedent("""
    import sys, time
    from dagster import DagsterInstance
    from pipeline.core.pool_limit import pool_slot
    instance = DagsterInstance.from_config(sys.argv[1])
    with pool_slot(instance, "medtune_training", lambda line: print(line, flush=True)):
        print("held", flush=True)
        time.sleep(600)
""")


def test_on_postgresql_the_limit_holds_across_the_machines_sharing_the_instance(postgres, tmp_path, monkeypatch):
    """Two homes on one PostgreSQL instance, as two machines have: while one holds the training slot
    the other waits (no lock file could see that); killing the holder frees the slot."""
    import threading

    from dagster import DagsterInstance

    monkeypatch.setenv("MEDTUNE_POSTGRES_URL", postgres.url())
    monkeypatch.setenv("PGPASSWORD", postgres.password)  # the settings name no password: libpq reads it
    here, there = tmp_path / "here", tmp_path / "there"
    for home in (here, there):
        ensure_dagster_home(home)
    holder = subprocess.Popen(
        [sys.executable, "-c", PG_HOLDER, str(there)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )
    killer = threading.Timer(0, lambda: None)
    instance = DagsterInstance.from_config(str(here))
    try:
        lines = [holder.stdout.readline().strip() for _ in range(2)]
        assert lines == [
            "holding medtune_training slot 1 of 1 among the instance's machines (PostgreSQL advisory lock)",
            "held",
        ], lines
        killer = threading.Timer(1.5, holder.kill)
        killer.start()
        said = []
        start = time.monotonic()
        with pool_slot(instance, "medtune_training", said.append) as slot:
            waited = time.monotonic() - start
            assert slot == 0
    finally:
        killer.cancel()
        holder.kill()
        holder.wait()
        instance.dispose()
    assert said == [
        "all 1 medtune_training slot(s) among the instance's machines (PostgreSQL advisory lock) are taken: waiting",
        "holding medtune_training slot 1 of 1 among the instance's machines (PostgreSQL advisory lock)",
        "released medtune_training slot 1 of 1",
    ]
    assert 1.4 < waited < 60  # the server dropped the dead holder's lock with its connection
    assert not (here / "pool_slots").exists() and not (there / "pool_slots").exists()


def test_on_postgresql_a_lost_lock_is_noticed_and_frees_the_slot(postgres, tmp_path, monkeypatch):
    """The server ends the holder's session (pg_terminate_backend, as a dropped connection does): the
    holder hears of it within the check interval, and the slot is another's to take."""
    import sqlalchemy as sa
    from dagster import DagsterInstance

    from pipeline.core import pool_limit

    monkeypatch.setenv("MEDTUNE_POSTGRES_URL", postgres.url())
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    monkeypatch.setattr(pool_limit, "LOCK_CHECK_S", 0.2)
    here, there = tmp_path / "here", tmp_path / "there"
    for home in (here, there):
        ensure_dagster_home(home)
    instance, other = DagsterInstance.from_config(str(here)), DagsterInstance.from_config(str(there))
    lost = []
    try:
        with pool_slot(instance, "medtune_training", lambda line: None, on_lost=lost.append):
            engine = sa.create_engine(pool_limit.instance_postgres_url(instance), isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                ended = conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND pid <> "
                        "pg_backend_pid()"
                    )
                ).scalar()
            engine.dispose()
            assert ended == 1
            deadline = time.monotonic() + 10
            while not lost and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(lost) == 1 and "the connection holding it was lost" in lost[0], lost
            said = []
            with pool_slot(other, "medtune_training", said.append) as slot:  # free at once: no waiting
                assert slot == 0 and not any("waiting" in s for s in said)
    finally:
        instance.dispose()
        other.dispose()
