"""The Dagster instance's settings and the stores' databases: ``python -m pipeline.ops.instance``.

Writes ``$DAGSTER_HOME/dagster.yaml`` from ``pipeline/dagster.yaml`` (run queue, one training at a
time), with PostgreSQL storage when ``MEDTUNE_POSTGRES_URL`` is set (``pipeline/core/stores.py``),
and, for PostgreSQL, creates the MLflow store's database when it is missing. ``make run``, ``make
test``, ``make ui`` and ``pipeline.ops.ui`` call it; it rewrites only a file it wrote itself (first
line: the header), so a ``dagster.yaml`` of your own stays as it is.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from pathlib import Path

from pipeline.core.atomic import write_bytes_atomic
from pipeline.core.secrets import redact
from pipeline.core.stores import (
    DAGSTER_HEADER,
    configured_postgres_url,
    dagster_settings,
    ensure_database,
    tracking_uri,
)

TEMPLATE = Path(__file__).parents[1] / "dagster.yaml"


def ensure_dagster_home(home: Path, env=os.environ) -> Path:
    """``home/dagster.yaml`` as the template and the environment say, unless it is the user's own."""
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    wanted = dagster_settings(TEMPLATE.read_text(), env)
    if settings.is_file():
        current = settings.read_text()
        # written here, or a copy of the template (as an older Makefile made)
        ours = current.startswith((DAGSTER_HEADER, "# Template for $DAGSTER_HOME/dagster.yaml"))
        if current == wanted or not ours:
            return home
    write_bytes_atomic(settings, wanted.encode())
    return home


def ensure_stores(home: Path, env=os.environ, log=print) -> None:
    ensure_dagster_home(home, env)
    pg = configured_postgres_url(env)
    uri = tracking_uri(env)
    if pg and uri.startswith("postgresql"):
        if ensure_database(uri):
            log(f"created the MLflow store's database: {redact(uri)}")
    log(
        f"Dagster instance {home} ({'PostgreSQL ' + redact(pg) if pg else 'SQLite files in the home'}); MLflow store "
        f"{redact(uri)}"
    )
    if pg and urllib.parse.urlsplit(pg).password and not env.get("PGPASSWORD"):
        log(
            "the instance settings name no password: Dagster commands you start yourself need PGPASSWORD "
            "(or ~/.pgpass); make and pipeline.ops.ui set it from MEDTUNE_POSTGRES_URL"
        )


def main() -> int:
    home = Path(os.environ.get("DAGSTER_HOME") or Path(__file__).parents[2] / ".dagster_home").resolve()
    try:
        ensure_stores(home)
    except ValueError as exc:
        print(f"pipeline.ops.instance: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
