"""raw_data_sensor's logic (content fingerprint, debounce), the sensor in a Dagster instance,
the presets and the concurrency settings."""

import os
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, build_sensor_context, validate_run_config

from conftest import demo_records, write_json
from pipeline.ops.raw_watch import EMPTY, WatchState, decide, raw_fingerprint


def test_fingerprint_is_content_not_mtime(raw_dir):
    assert raw_fingerprint(raw_dir) == EMPTY
    f = write_json(raw_dir / "a.json", demo_records(3))
    first = raw_fingerprint(raw_dir)
    os.utime(f, (time.time() + 100, time.time() + 100))  # touch
    assert raw_fingerprint(raw_dir) == first
    f.write_bytes(f.read_bytes())  # rewrite, same bytes
    assert raw_fingerprint(raw_dir) == first
    (raw_dir / "notes.txt").write_text("not data")  # not a file raw_records reads
    assert raw_fingerprint(raw_dir) == first
    write_json(raw_dir / "sub" / "b.jsonl", demo_records(1))
    second = raw_fingerprint(raw_dir)
    assert second != first
    (raw_dir / "sub" / "b.jsonl").rename(raw_dir / "sub" / "c.jsonl")  # a rename is a change (provenance)
    assert raw_fingerprint(raw_dir) not in (first, second)


def test_fingerprint_cache_reads_only_changed_files(raw_dir, tmp_path, monkeypatch):
    """Cached by stat: an unchanged file is not read again; a file rewritten with the same size
    and its mtime put back is still noticed (its ctime moved); a file hashed in the same moment it
    was written is read again next time."""
    import pipeline.stages.raw_records.files as files

    cache = tmp_path / "digests.json"
    a = write_json(raw_dir / "a.json", demo_records(3))
    b = write_json(raw_dir / "b.json", demo_records(4))
    old = time.time() - 60
    for f in (a, b):
        os.utime(f, (old, old))
    uncached = raw_fingerprint(raw_dir)
    reads = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    first = raw_fingerprint(raw_dir, cache)
    assert first == uncached and sorted(reads) == ["a.json", "b.json"]
    reads.clear()
    assert raw_fingerprint(raw_dir, cache) == first and reads == []  # nothing read
    data = a.read_bytes()
    a.write_bytes(data.replace("咳嗽".encode(), "头痛".encode(), 1))  # same size
    os.utime(a, (old, old))  # the mtime put back
    changed = raw_fingerprint(raw_dir, cache)
    assert changed != first and reads == ["a.json"]
    reads.clear()
    write_json(raw_dir / "c.json", demo_records(2))  # written now: too fresh to trust its stat
    raw_fingerprint(raw_dir, cache)
    raw_fingerprint(raw_dir, cache)
    assert reads == ["c.json", "c.json"]


def test_debounce_one_run_per_settled_change():
    s = WatchState()
    d = decide(s, "A", now=0, quiet_seconds=5, built="A")
    assert d.action == "baseline" and d.state.seen == "A"
    d = decide(d.state, "A", now=1, quiet_seconds=5)
    assert d.action == "none"
    # a burst: B, C, D within the quiet window; only D, once settled, runs
    d = decide(d.state, "B", now=2, quiet_seconds=5)
    assert d.action == "wait"
    d = decide(d.state, "C", now=3, quiet_seconds=5)
    assert d.action == "wait" and d.state.pending == "C"
    d = decide(d.state, "D", now=4, quiet_seconds=5)
    d = decide(d.state, "D", now=6, quiet_seconds=5)
    assert d.action == "wait"  # quiet for 2 of 5 s
    d = decide(d.state, "D", now=9.5, quiet_seconds=5)
    assert d.action == "run" and d.state.seen == "D" and d.state.pending is None
    assert decide(d.state, "D", now=20, quiet_seconds=5).action == "none"
    # changed back to what was last built: nothing to do
    d2 = decide(d.state, "E", now=21, quiet_seconds=5)
    assert decide(d2.state, "D", now=30, quiet_seconds=5).action == "none"


def test_a_fresh_sensor_compares_with_the_last_build():
    assert decide(WatchState(), "A", 0, 5, built=None).action == "baseline"
    d = decide(WatchState(), "B", 0, 5, built="A")  # the data changed while no sensor was watching
    assert d.action == "wait" and d.state.seen == "A"
    assert decide(d.state, "B", 6, 5).action == "run"


def test_cursor_round_trip_and_garbage():
    s = WatchState(seen="a", pending="b", pending_since=1.5)
    assert WatchState.load(s.dump()) == s
    assert WatchState.load("not json") == WatchState()
    assert WatchState.load(None) == WatchState()


def test_sensor_requests_one_run_keyed_by_fingerprint(tmp_path, monkeypatch):
    from pipeline.definitions import defs
    from pipeline.ops import automation
    from resources.data_root import DataRoot

    raw = tmp_path / "data" / "raw"
    write_json(raw / "a.json", demo_records(4))
    instance = DagsterInstance.ephemeral()
    sensor = defs.get_sensor_def("raw_data_sensor")
    root = DataRoot(path=str(tmp_path / "data"))
    monkeypatch.setitem(automation.SENSOR, "quiet_seconds", 0.2)

    def tick(cursor):
        ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"data_root": root})
        result = sensor.evaluate_tick(ctx)
        return result, ctx.cursor

    result, cursor = tick(None)
    assert not result.run_requests  # baseline
    write_json(raw / "b.json", demo_records(2))
    result, cursor = tick(cursor)
    assert not result.run_requests  # waiting for quiet
    time.sleep(0.3)
    result, cursor = tick(cursor)
    (request,) = result.run_requests
    assert request.run_key == f"raw-{raw_fingerprint(raw)}"
    assert request.tags["medtune/trigger"] == "raw_data_sensor"
    (raw / "b.json").write_bytes((raw / "b.json").read_bytes())  # same content again
    time.sleep(0.3)
    result, cursor = tick(cursor)
    assert not result.run_requests

    # the data put back to a state a sensor run built: Dagster would skip a run key it has seen
    from dagster._core.storage.dagster_run import DagsterRun

    built = raw_fingerprint(raw)
    instance.add_run(DagsterRun(job_name="full_pipeline_job", run_id="1" * 32, tags=request.tags))
    b = (raw / "b.json").read_bytes()
    for content in (None, b):
        (raw / "b.json").unlink(missing_ok=True) if content is None else (raw / "b.json").write_bytes(content)
        result, cursor = tick(cursor)
        time.sleep(0.3)
        result, cursor = tick(cursor)
        (request,) = result.run_requests
        instance.add_run(DagsterRun(job_name="full_pipeline_job", tags=request.tags))
    assert request.run_key == f"raw-{built}-1"


def test_presets_validate_against_the_jobs():
    from pipeline.definitions import defs
    from pipeline.ops.jobs import PRESETS, load_preset, preset_job_name

    job = defs.resolve_job_def("full_pipeline_job")
    for name in PRESETS:
        config = load_preset(name)
        validate_run_config(job, config)
    seed = load_preset("seed-qwen1.5-1.8b")["ops"]["lora_adapter"]["config"]
    assert (seed["r"], seed["lora_alpha"], seed["lora_dropout"], seed["target_modules"], seed["learning_rate"]) == (
        8,
        32,
        0.1,
        "q_proj,v_proj",
        5e-5,
    )
    assert defs.resolve_job_def(preset_job_name("gpu-qwen2.5-1.5b")).tags["medtune/preset"] == "gpu-qwen2.5-1.5b"
    with pytest.raises(ValueError, match="no preset"):
        load_preset("nope")


def test_training_runs_are_limited_to_one():
    from pipeline.definitions import defs

    settings = yaml.safe_load((Path(__file__).parents[1] / "pipeline" / "dagster.yaml").read_text())
    limits = settings["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "medtune/training", "limit": 1} in limits
    assert settings["concurrency"]["pools"]["default_limit"] == 1
    for name in ("train_job", "full_pipeline_job"):
        assert defs.resolve_job_def(name).tags.get("medtune/training") == "true"
    assert defs.get_assets_def("lora_adapter").op.pool == "medtune_training"
    schedule = defs.get_schedule_def("periodic_retrain_schedule")
    assert schedule.default_status.value == "STOPPED"
    assert defs.get_sensor_def("raw_data_sensor").default_status.value == "RUNNING"


def test_a_file_unreadable_for_good_does_not_stall_the_sensor(tmp_path, monkeypatch):
    import errno

    import pipeline.stages.raw_records.files as rw

    raw = tmp_path / "raw"
    write_json(raw / "a.json", demo_records(2))
    write_json(raw / "b.json", demo_records(3))
    readable = raw_fingerprint(raw)
    real = rw.sha256_file

    def denied(path):
        if path.name == "b.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(rw, "sha256_file", denied)
    fp = raw_fingerprint(raw)
    assert len(fp) == 64 and fp != readable  # a real fingerprint: the sensor can act, raw_records rejects b.json

    def vanished(path):
        raise FileNotFoundError(errno.ENOENT, "No such file", str(path))

    monkeypatch.setattr(rw, "sha256_file", vanished)
    assert raw_fingerprint(raw) == "unreadable"  # being replaced: look again on the next tick
