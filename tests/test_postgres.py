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
    assert tracking_uri({"MEDTUNE_POSTGRES_URL": URL}) == "postgresql+psycopg2://team:s3cret@db.internal:5432/medtune_mlflow"
    assert tracking_uri({"MEDTUNE_POSTGRES_URL": URL, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == "http://mlflow:5000"
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
    assert artifact_root("postgresql://u@h/m_mlflow", {"MEDTUNE_ARTIFACT_ROOT": "s3://bucket/medtune"}) == "s3://bucket/medtune"


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
    done = subprocess.run([sys.executable, "-m", "pipeline.ops.instance"], cwd=PROJECT, env=env, capture_output=True, text=True)
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
            instance.report_dagster_event(DagsterEvent("PIPELINE_START", job_name="train_job", pid=gone.pid), run.run_id)
            runs[name] = run.run_id
        assert {instance.get_run_by_id(r).status for r in runs.values()} == {DagsterRunStatus.STARTED}
        recovered = recover_dead_runs(instance, log=lambda line: None)
        assert [r.run_id for r in recovered] == [runs["here"]]
        status = {name: instance.get_run_by_id(r).status for name, r in runs.items()}
        assert status == {"here": DagsterRunStatus.FAILURE, "elsewhere": DagsterRunStatus.STARTED, "unknown": DagsterRunStatus.STARTED}
    finally:
        instance.dispose()
