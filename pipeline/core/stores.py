"""Where the Dagster instance and the MLflow store live: SQLite files on one machine (the default) or
one PostgreSQL server that a team shares.

    export MEDTUNE_POSTGRES_URL=postgresql://medtune:secret@db.internal:5432/medtune

switches both. The Dagster instance (runs, event logs, schedules, sensor ticks, pool slots) uses that
database (``$DAGSTER_HOME/dagster.yaml`` gets a ``storage: postgres`` section naming the server, never
the password: Dagster's processes find it the standard libpq way, in ``PGPASSWORD`` or ``~/.pgpass``;
``make`` and ``pipeline.ops.ui`` set ``PGPASSWORD`` from the URL when it carries one, so the password
is in no file and not in the instance settings the Dagster UI shows). The MLflow tracking store and model
registry use the database of the same name with ``_mlflow`` appended, on the same server (created
when missing and the role may): both tools name a table ``runs`` and ``alembic_version``, so they
cannot share one database.

The standard setting of each tool still wins: ``MLFLOW_TRACKING_URI`` (an MLflow server or any store)
over the derived URI, and a ``$DAGSTER_HOME/dagster.yaml`` without this project's header line (one you
wrote) is left as it is. Artifacts (adapters, evaluations, the registered model's files) stay on a
path, ``MEDTUNE_ARTIFACT_ROOT`` (default ``mlflow/artifacts`` of the project, next to a SQLite store):
a shared folder for a team, or an object-store URI (docs/operations.md).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import yaml

from pipeline.core.secrets import redact

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_ENV = "MEDTUNE_POSTGRES_URL"
ARTIFACT_ROOT_ENV = "MEDTUNE_ARTIFACT_ROOT"
MLFLOW_DB_SUFFIX = "_mlflow"
# the host whose process runs a training (a run's pid means something on that host only: on an
# instance that several machines share, pipeline.ops.recover judges only its own host's runs)
RUN_HOST_TAG = "medtune/host"
DEFAULT_SQLITE_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow' / 'mlflow.db'}"
# the first line of a dagster.yaml that pipeline.ops.instance wrote (and may rewrite)
DAGSTER_HEADER = (
    "# Written by `python -m pipeline.ops.instance` from pipeline/dagster.yaml; edit that file, or remove this line to "
    "keep your own."
)
DRIVER_SCHEME = "postgresql+psycopg2"  # psycopg2 (dagster-postgres needs it); SQLAlchemy 2.1 would pick psycopg 3


def tag_run_host(instance, run_id: str, warn) -> None:
    """Tag a Dagster run with this host: on a shared instance only this host may judge whether it died."""
    import socket

    try:
        instance.add_run_tags(run_id, {RUN_HOST_TAG: socket.gethostname()})
    except Exception as exc:  # a label, never a reason to fail a run
        warn(f"could not tag the run with its host: {exc}")


class StoreConfigError(ValueError):
    """A store location that cannot work; the message says which variable and why."""


def configured_postgres_url(env: Mapping[str, str] = os.environ) -> str | None:
    """``MEDTUNE_POSTGRES_URL``, checked: a ``postgresql://`` URL that names a database; None when unset."""
    url = (env.get(POSTGRES_ENV) or "").strip()
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
        raise StoreConfigError(
            f"{POSTGRES_ENV}={redact(url)!r}: expected postgresql://user:password@host:port/database"
            + (" (write postgresql://, SQLAlchemy no longer accepts postgres://)" if parts.scheme == "postgres" else "")
        )
    if not parts.hostname or not parts.path.strip("/"):
        raise StoreConfigError(
            f"{POSTGRES_ENV}={redact(url)!r}: name the host and the database (postgresql://user@host:5432/medtune)"
        )
    return url


def database_name(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.strip("/"))


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name)))


def with_driver(url: str) -> str:
    return urllib.parse.urlsplit(url)._replace(scheme=DRIVER_SCHEME).geturl()


def mlflow_database_url(url: str) -> str:
    """The MLflow store's database on the server of ``url``: ``<database>_mlflow``, through psycopg2."""
    return with_driver(with_database(url, database_name(url) + MLFLOW_DB_SUFFIX))


def tracking_uri(env: Mapping[str, str] = os.environ) -> str:
    """MLflow's store: ``MLFLOW_TRACKING_URI``, else the PostgreSQL one, else ``mlflow/mlflow.db``."""
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    pg = configured_postgres_url(env)
    return mlflow_database_url(pg) if pg else DEFAULT_SQLITE_URI


def artifact_root(uri: str, env: Mapping[str, str] = os.environ) -> str:
    """Where new experiments keep their artifacts: ``MEDTUNE_ARTIFACT_ROOT`` (a folder or an object-store
    URI), else ``artifacts/`` next to a SQLite store, else the project's ``mlflow/artifacts``."""
    root = env.get(ARTIFACT_ROOT_ENV)
    if not root:
        folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else PROJECT_ROOT / "mlflow"
        root = str(folder / "artifacts")
    return root if "://" in root else Path(root).resolve().as_uri()


def dagster_settings(template: str, env: Mapping[str, str] = os.environ) -> str:
    """The text of ``$DAGSTER_HOME/dagster.yaml``: the project's template, plus PostgreSQL storage when
    ``MEDTUNE_POSTGRES_URL`` is set."""
    text = DAGSTER_HEADER + "\n" + template.rstrip() + "\n"
    url = configured_postgres_url(env)
    if not url:
        return text
    parts = urllib.parse.urlsplit(url)
    fields = {
        "scheme": DRIVER_SCHEME,
        "username": urllib.parse.unquote(parts.username or ""),
        "hostname": parts.hostname,
        "port": parts.port or 5432,
        "db_name": database_name(url),
    }
    if parts.query:
        fields["params"] = dict(urllib.parse.parse_qsl(parts.query))
    storage = {"storage": {"postgres": {"postgres_db": {k: v for k, v in fields.items() if v != ""}}}}
    return (
        text + "\n# MEDTUNE_POSTGRES_URL was set when this file was written: runs, events, schedules and pool\n"
        "# slots live in this PostgreSQL database (pipeline/core/stores.py)\n"
        + yaml.safe_dump(storage, sort_keys=False)
    )


def libpq_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``PGPASSWORD`` from ``MEDTUNE_POSTGRES_URL`` when the URL carries a password and it is not set yet:
    what Dagster's processes need, since their settings name no password."""
    url = configured_postgres_url(env)
    password = urllib.parse.unquote(urllib.parse.urlsplit(url).password or "") if url else ""
    return {"PGPASSWORD": password} if password and not env.get("PGPASSWORD") else {}


def ensure_database(url: str, timeout_s: int = 10) -> bool:
    """Create the database ``url`` names when it is missing (connecting to the server's ``postgres``
    database as the same role). True when it was created. Errors name the server, never the password."""
    import psycopg2
    from psycopg2 import sql

    name = database_name(url)
    admin = with_database(urllib.parse.urlsplit(url)._replace(scheme="postgresql").geturl(), "postgres")
    try:
        conn = psycopg2.connect(admin, connect_timeout=timeout_s)
    except psycopg2.Error as exc:
        raise StoreConfigError(f"PostgreSQL at {redact(admin)} is unreachable: {redact(str(exc)).strip()}") from exc
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return False
            try:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg2.errors.DuplicateDatabase:  # created by another process in the meantime
                return False
            except psycopg2.Error as exc:
                raise StoreConfigError(
                    f"database {name!r} is missing on {redact(admin)} and could not be created "
                    f"({str(exc).strip()}); ask its administrator to create it"
                ) from exc
            return True
    finally:
        conn.close()
