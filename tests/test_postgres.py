"""One instance and one registry for a team: MEDTUNE_POSTGRES_URL switches the Dagster instance and the
MLflow store to PostgreSQL (pipeline/core/stores.py, pipeline/ops/instance.py). These tests use a
real server (the ``postgres`` fixture); the end-to-end runs against it are in test_e2e_servers.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.stores import (
    DAGSTER_HEADER,
    StoreConfigError,
    artifact_root,
    configured_postgres_url,
    dagster_settings,
    libpq_env,
    mlflow_database_url,
    tracking_uri,
)
from pipeline.ops.instance import TEMPLATE, ensure_dagster_home

pytestmark = pytest.mark.slow  # a PostgreSQL server: make test, not make test-fast

PROJECT = Path(__file__).resolve().parents[1]
URL = "postgresql://team:s3cret@db.internal:5432/medtune"


def test_the_url_switches_both_stores_and_each_tools_own_setting_wins():
    assert tracking_uri({}).startswith("sqlite:///") and tracking_uri({}).endswith("mlflow/mlflow.db")
    assert (
        tracking_uri({"MEDTUNE_POSTGRES_URL": URL})
        == "postgresql+psycopg2://team:s3cret@db.internal:5432/medtune_mlflow"
    )
    assert (
        tracking_uri({"MEDTUNE_POSTGRES_URL": URL, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == "http://mlflow:5000"
    )
    assert "storage:" not in dagster_settings(TEMPLATE.read_text(), {})
    text = dagster_settings(TEMPLATE.read_text(), {"MEDTUNE_POSTGRES_URL": URL + "?sslmode=require"})
    settings = yaml.safe_load(text)
    assert settings["storage"]["postgres"]["postgres_db"] == {
        "scheme": "postgresql+psycopg2",
        "username": "team",
        "hostname": "db.internal",
        "port": 5432,
        "db_name": "medtune",
        "params": {"sslmode": "require"},
    }
    assert settings["concurrency"] == yaml.safe_load(TEMPLATE.read_text())["concurrency"]
    # no password in the file (nor in the instance settings the UI shows): libpq reads PGPASSWORD
    assert "s3cret" not in text
    assert libpq_env({"MEDTUNE_POSTGRES_URL": URL}) == {"PGPASSWORD": "s3cret"}
    assert libpq_env({"MEDTUNE_POSTGRES_URL": URL, "PGPASSWORD": "own"}) == {}
    assert libpq_env({"MEDTUNE_POSTGRES_URL": "postgresql://team@db/medtune"}) == libpq_env({}) == {}
    assert mlflow_database_url("postgresql://u@h/team%20db") == "postgresql+psycopg2://u@h/team%20db_mlflow"


@pytest.mark.parametrize(
    "bad, says",
    [
        ("postgres://u@h:5432/medtune", "write postgresql://"),
        ("mysql://u@h/medtune", "expected postgresql://"),
        ("postgresql://u:pw@h:5432/", "name the host and the database"),
    ],
)
def test_a_wrong_url_is_named_without_its_password(bad, says):
    with pytest.raises(StoreConfigError, match=says) as err:
        configured_postgres_url({"MEDTUNE_POSTGRES_URL": bad})
    assert "MEDTUNE_POSTGRES_URL" in str(err.value) and ":pw@" not in str(err.value)


def test_artifacts_stay_on_a_path_or_an_object_store(tmp_path):
    assert artifact_root("sqlite:////srv/mlflow/mlflow.db", {}) == "file:///srv/mlflow/artifacts"
    assert artifact_root("postgresql://u@h/m_mlflow", {}).endswith("/mlflow/artifacts")
    assert artifact_root("postgresql://u@h/m_mlflow", {"MEDTUNE_ARTIFACT_ROOT": str(tmp_path)}) == tmp_path.as_uri()
    assert (
        artifact_root("postgresql://u@h/m_mlflow", {"MEDTUNE_ARTIFACT_ROOT": "s3://bucket/medtune"})
        == "s3://bucket/medtune"
    )


def test_the_instance_settings_follow_the_environment_but_never_replace_a_users_own(tmp_path):
    home = tmp_path / "home"
    ensure_dagster_home(home, {})
    settings = home / "dagster.yaml"
    assert settings.read_text().startswith(DAGSTER_HEADER) and "storage:" not in settings.read_text()
    ensure_dagster_home(home, {"MEDTUNE_POSTGRES_URL": URL})  # switched on later: rewritten
    assert "postgres:" in settings.read_text()
    ensure_dagster_home(home, {})  # and off again
    assert "storage:" not in settings.read_text()
    settings.write_text("telemetry:\n  enabled: false\n")  # the user's own
    ensure_dagster_home(home, {"MEDTUNE_POSTGRES_URL": URL})
    assert settings.read_text() == "telemetry:\n  enabled: false\n"


def test_instance_and_mlflow_store_live_on_the_server(postgres, tmp_path, monkeypatch):
    from dagster import DagsterInstance
    from mlflow.tracking import MlflowClient

    from resources.mlflow_tracking import MlflowTracking

    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "MEDTUNE_POSTGRES_URL": postgres.url(),
        "MEDTUNE_ARTIFACT_ROOT": str(tmp_path / "shared-artifacts"),
        "PYTHONPATH": str(PROJECT),
    }
    env.pop("MLFLOW_TRACKING_URI")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.instance"], cwd=PROJECT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "created the MLflow store's database" in done.stdout and "PostgreSQL" in done.stdout

    monkeypatch.setenv("MEDTUNE_POSTGRES_URL", postgres.url())
    assert postgres.password not in (tmp_path / "home" / "dagster.yaml").read_text()
    monkeypatch.setenv("PGPASSWORD", postgres.password)  # the settings name no password: libpq reads it here
    instance = DagsterInstance.from_config(str(tmp_path / "home"))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
    finally:
        instance.dispose()
    assert not list((tmp_path / "home").rglob("*.db"))  # no SQLite file beside it

    monkeypatch.setenv("MEDTUNE_ARTIFACT_ROOT", str(tmp_path / "shared-artifacts"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking = MlflowTracking()
    assert tracking.tracking_uri == postgres.url("medtune_mlflow").replace("postgresql:", "postgresql+psycopg2:")
    tracking.check_reachable()
    run = MlflowClient(tracking.tracking_uri).create_run(tracking.experiment_id())
    MlflowClient(tracking.tracking_uri).log_metric(run.info.run_id, "loss", 1.5)
    assert run.info.artifact_uri.startswith((tmp_path / "shared-artifacts").as_uri())
    assert postgres.query("medtune_mlflow", "SELECT key, value FROM metrics") == [("loss", 1.5)]


def test_an_unreachable_server_is_named_without_its_password():
    from resources.mlflow_tracking import MlflowTracking, TrackingUnavailable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{port}.*unreachable") as err:
        MlflowTracking(tracking_uri=f"postgresql://u:hunter22@127.0.0.1:{port}/x_mlflow").check_reachable(timeout=3)
    assert "hunter22" not in str(err.value)


def test_on_a_shared_instance_recovery_judges_only_this_hosts_runs(postgres, tmp_path, monkeypatch):
    """A pid means something only on its host: a dead-looking run of another machine is left alone."""
    from dagster import DagsterEvent, DagsterInstance, DagsterRunStatus
    from dagster._core.storage.dagster_run import DagsterRun

    from pipeline.core.stores import RUN_HOST_TAG
    from pipeline.ops.recover import recover_dead_runs

    monkeypatch.setenv("MEDTUNE_POSTGRES_URL", postgres.url())
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    ensure_dagster_home(tmp_path / "home")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    instance = DagsterInstance.from_config(str(tmp_path / "home"))
    try:
        runs = {}
        for name, host in (("here", socket.gethostname()), ("elsewhere", "gpu-node-7"), ("unknown", None)):
            run = instance.add_run(DagsterRun(job_name="train_job", tags={RUN_HOST_TAG: host} if host else {}))
            instance.report_dagster_event(
                DagsterEvent("PIPELINE_START", job_name="train_job", pid=gone.pid), run.run_id
            )
            runs[name] = run.run_id
        assert {instance.get_run_by_id(r).status for r in runs.values()} == {DagsterRunStatus.STARTED}
        recovered = recover_dead_runs(instance, log=lambda line: None)
        assert [r.run_id for r in recovered] == [runs["here"]]
        status = {name: instance.get_run_by_id(r).status for name, r in runs.items()}
        assert status == {
            "here": DagsterRunStatus.FAILURE,
            "elsewhere": DagsterRunStatus.STARTED,
            "unknown": DagsterRunStatus.STARTED,
        }
    finally:
        instance.dispose()


def test_a_launched_run_is_tagged_with_its_host_before_its_process_starts(postgres, tmp_path, monkeypatch):
    """The instance's launcher (pipeline/ops/launcher.py) tags the run, then starts its process: a run
    whose process dies before any step ran is still judged by this host's recovery."""
    from dagster import DagsterEvent, DagsterInstance, DagsterRunStatus, DefaultRunLauncher
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.storage.dagster_run import DagsterRun

    from pipeline.core.stores import RUN_HOST_TAG
    from pipeline.ops.launcher import HostTaggingRunLauncher
    from pipeline.ops.recover import recover_dead_runs

    monkeypatch.setenv("MEDTUNE_POSTGRES_URL", postgres.url())
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    ensure_dagster_home(tmp_path / "home")
    gone = subprocess.Popen(["true"])
    gone.wait()
    seen = []

    def start_process(self, context):  # what Dagster's launcher does: the run's process starts, then dies
        seen.append(dict(self._instance.get_run_by_id(context.dagster_run.run_id).tags))
        self._instance.report_dagster_event(
            DagsterEvent("PIPELINE_START", job_name="train_job", pid=gone.pid), context.dagster_run.run_id
        )

    monkeypatch.setattr(DefaultRunLauncher, "launch_run", start_process)
    instance = DagsterInstance.from_config(str(tmp_path / "home"))
    try:
        assert isinstance(instance.run_launcher, HostTaggingRunLauncher)
        run = instance.add_run(DagsterRun(job_name="train_job"))
        instance.run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
        assert seen == [{RUN_HOST_TAG: socket.gethostname()}]
        assert [r.run_id for r in recover_dead_runs(instance, log=lambda line: None)] == [run.run_id]
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    finally:
        instance.dispose()


def test_a_lost_training_lock_stops_the_run_at_a_checkpoint_and_the_next_resumes(
    postgres, tmp_path, monkeypatch, tiny_model_dir
):
    """The whole path on a real server: lora_adapter trains holding the slot's advisory lock; the
    server ends that session (pg_terminate_backend, as a restart or a network cut does); the asset
    notices, the child saves a checkpoint and the run fails saying why; the next run resumes there."""
    import json
    import threading
    import time

    import sqlalchemy as sa
    from dagster import AssetSelection, DagsterInstance, materialize

    from conftest import demo_records, mlflow_store, model_in_data_root, write_json
    from pipeline.core import pool_limit
    from pipeline.definitions import all_assets, make_resources

    monkeypatch.setenv("MEDTUNE_POSTGRES_URL", postgres.url())
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    monkeypatch.setattr(pool_limit, "LOCK_CHECK_S", 0.2)
    ensure_dagster_home(tmp_path / "home")
    data_dir = tmp_path / "data"
    write_json(data_dir / "raw" / "demo.json", demo_records(24))
    resources = make_resources(str(data_dir), mlflow_store(tmp_path / "mlflow.db"))
    train = {
        "max_steps": 40,
        "save_every": 100,
        "eval_every": 100,
        "log_every": 1,
        "precision": "fp32",
        "r": 8,
        "compile": False,
    }
    config = {
        "ops": {
            "base_model": {"config": {"model": model_in_data_root(tiny_model_dir, data_dir)}},
            "tokenized_dataset": {"config": {"max_seq_len": 256}},
            "lora_adapter": {"config": train},
        }
    }
    terminated = []

    def end_the_lock_session():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            logs = list((data_dir / "models" / "checkpoints").glob("*/metrics.jsonl"))
            if logs and logs[0].read_text().count('"train_loss"') >= 2:
                engine = sa.create_engine(pool_limit.instance_postgres_url(instance), isolation_level="AUTOCOMMIT")
                with engine.connect() as conn:
                    terminated.append(
                        conn.execute(
                            sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory'")
                        ).scalar()
                    )
                engine.dispose()
                return
            time.sleep(0.05)

    instance = DagsterInstance.from_config(str(tmp_path / "home"))
    try:
        selection = AssetSelection.assets("lora_adapter").upstream()
        killer = threading.Thread(target=end_the_lock_session, daemon=True)
        killer.start()
        first = materialize(
            all_assets,
            selection=selection,
            resources=resources,
            instance=instance,
            run_config=config,
            raise_on_error=False,
        )
        killer.join(timeout=10)
        assert terminated == [1] and not first.success
        (failure,) = [e for e in first.all_events if e.event_type_value == "STEP_FAILURE"]
        said = failure.event_specific_data.error.message
        assert (
            "TrainingStopped: the lock of the medtune_training slot was lost" in said
            and "stopped at checkpoint step-" in said
        ), said
        step = said.split("stopped at checkpoint step-")[1].split(":")[0].split(";")[0].strip()
        assert 2 <= int(step) < 40
        second = materialize(all_assets, selection=selection, resources=resources, instance=instance, run_config=config)
        record = (
            Path(second.asset_materializations_for_node("lora_adapter")[0].metadata["path"].value)
            / "medtune_training.json"
        )
        result = json.loads(record.read_text())["result"]
        assert result["steps"] == 40 and result["resumed_from"] == f"step-{step}", result
    finally:
        instance.dispose()
