"""``make ui``: the Dagster UI (webserver and daemon, so the sensor and the schedule run) and an
MLflow tracking server over the project's store, both on loopback, stopped together on Ctrl-C.

    python -m pipeline.ops.ui [--host 127.0.0.1] [--dagster-port 3000] [--mlflow-port 5000]

Locations come from the environment: ``DAGSTER_HOME`` (default ``.dagster_home/``, the instance
settings written by ``pipeline.ops.instance``), ``MEDTUNE_DATA_DIR``, and the stores
(``pipeline/core/stores.py``): SQLite files by default (``mlflow/mlflow.db``; the Dagster runs write
to it, the MLflow server reads the same file), or one PostgreSQL server for the Dagster instance and
the MLflow store when ``MEDTUNE_POSTGRES_URL`` is set. The end-to-end tests start the servers through
this same module.

Shutdown: both servers start in sessions of their own with SIGINT and SIGTERM reset to their
defaults (``dagster dev`` started in the background of a non-interactive shell inherits them
ignored and would hang), and Ctrl-C or SIGTERM here sends SIGTERM to each server's whole process group, then
SIGKILL to what is left after a grace period.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.secrets import redact
from pipeline.core.stores import artifact_root, libpq_env
from pipeline.ops.instance import ensure_dagster_home, ensure_stores
from resources.data_root import PROJECT_ROOT, default_data_dir
from resources.mlflow_tracking import default_tracking_uri

LOOPBACK = "127.0.0.1"


def _reset_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_store(uri: str) -> None:
    if not uri.startswith(("sqlite:///", "postgresql")):
        raise SystemExit(
            f"make ui serves a SQLite or PostgreSQL MLflow store; MLFLOW_TRACKING_URI is {uri!r} (a server already?)"
        )


@dataclass
class Servers:
    host: str
    dagster_port: int
    mlflow_port: int
    dagster_home: Path
    data_dir: Path
    tracking_uri: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def dagster_url(self) -> str:
        return f"http://{self.host}:{self.dagster_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home),
            "MEDTUNE_DATA_DIR": str(self.data_dir),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_BACKEND_STORE_URI": self.tracking_uri,
            "MEDTUNE_MLFLOW_UI_URL": self.mlflow_url,
            "PYTHONPATH": str(PROJECT_ROOT),
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "TOKENIZERS_PARALLELISM": "false",
            "GX_ANALYTICS_ENABLED": "false",
        }

    def start(self, log_dir: Path | None = None) -> None:
        bindir = Path(sys.executable).parent
        check_store(self.tracking_uri)
        ensure_stores(self.dagster_home, self.env(), log=lambda line: print(line, flush=True))
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        commands = {
            # the store's URI in the environment (MLFLOW_BACKEND_STORE_URI): a password stays out of `ps`
            "mlflow": [
                str(bindir / "mlflow"),
                "server",
                "--default-artifact-root",
                artifact_root(self.tracking_uri, self.env()),
                "--host",
                self.host,
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
            ],
            "dagster": [
                str(bindir / "dagster"),
                "dev",
                "-w",
                str(PROJECT_ROOT / "workspace.yaml"),
                "-h",
                self.host,
                "-p",
                str(self.dagster_port),
            ],
        }
        for name, cmd in commands.items():
            out = open(log_dir / f"{name}.log", "ab") if log_dir else None
            self.procs[name] = subprocess.Popen(
                cmd,
                cwd=PROJECT_ROOT,
                env=self.env(),
                start_new_session=True,
                preexec_fn=_reset_signals,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )

    def wait_ready(self, timeout: float = 180.0) -> None:
        checks = {"mlflow": self.mlflow_url + "/health", "dagster": self.dagster_url + "/server_info"}
        deadline = time.monotonic() + timeout
        pending = dict(checks)
        while pending:
            for name, url in list(pending.items()):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} before it was ready")
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        if resp.status == 200:
                            del pending[name]
                except (urllib.error.URLError, OSError):
                    pass
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f} s: {', '.join(pending)}")
            if pending:
                time.sleep(0.5)

    def stop(self, grace: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # whatever is left in the group (a run worker, a gunicorn/uvicorn child) goes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def recover(home: Path) -> None:
    """Runs killed outright earlier (their process is gone) would hold the training slot: free it."""
    from dagster import DagsterInstance

    from pipeline.ops.recover import recover_dead_runs

    ensure_dagster_home(home)
    try:
        instance = DagsterInstance.from_config(str(home))
        try:
            recover_dead_runs(instance)
        finally:
            instance.dispose()
    except Exception as exc:  # never keep the UIs from starting
        print(f"WARNING: could not check for dead runs: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start the Dagster UI and the MLflow UI together")
    ap.add_argument("--host", default=LOOPBACK, help="bind address (default loopback only)")
    ap.add_argument("--dagster-port", type=int, default=3000)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--log-dir", default=None, help="write the servers' output there instead of this terminal")
    args = ap.parse_args(argv)
    os.environ.update(libpq_env())  # the instance settings name no password; libpq reads PGPASSWORD
    servers = Servers(
        host=args.host,
        dagster_port=args.dagster_port,
        mlflow_port=args.mlflow_port,
        dagster_home=Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / ".dagster_home").resolve(),
        data_dir=Path(default_data_dir()).resolve(),
        tracking_uri=default_tracking_uri(),
    )
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            print(f"\nstopping (signal {signum}) ...", flush=True)
            servers.stop()
            print("stopped", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    recover(servers.dagster_home)
    servers.start(log_dir)
    if log_dir:  # for whoever must clean up after us (the end-to-end tests)
        (log_dir / "pids.json").write_text(json.dumps({n: p.pid for n, p in servers.procs.items()}))
    try:
        servers.wait_ready()
    except (RuntimeError, TimeoutError) as exc:
        print(f"could not start the UIs: {exc}", file=sys.stderr, flush=True)
        servers.stop()
        return 1
    print(f"Dagster UI  {servers.dagster_url}   (data {servers.data_dir}, home {servers.dagster_home})", flush=True)
    print(f"MLflow UI   {servers.mlflow_url}   (store {redact(servers.tracking_uri)})", flush=True)
    print("READY  (Ctrl-C stops both)", flush=True)
    while True:
        for name, proc in servers.procs.items():
            if proc.poll() is not None:
                print(f"{name} exited with code {proc.returncode}; stopping the other", file=sys.stderr, flush=True)
                servers.stop()
                return 1
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
