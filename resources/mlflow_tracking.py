"""MLflow tracking as a Dagster resource (a ``ConfigurableResource``, not the old function-style
dagster-mlflow resource). Default store: SQLite in the project's ``mlflow/`` folder."""

import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from pipeline.core.secrets import redact, redact_params
from pipeline.core.stores import artifact_root, ensure_database, tracking_uri


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the PostgreSQL store of ``MEDTUNE_POSTGRES_URL``, else ``mlflow/mlflow.db``."""
    return tracking_uri(os.environ)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached; the message names the URI."""


class MlflowTracking(ConfigurableResource):
    tracking_uri: str = Field(default_factory=default_tracking_uri)
    experiment: str = "medtune"
    artifact_root: str | None = Field(
        None,
        description="Artifact location for a new experiment (default: MEDTUNE_ARTIFACT_ROOT, else mlflow/artifacts)",
    )
    ui_url: str = Field(
        default_factory=lambda: os.environ.get("MEDTUNE_MLFLOW_UI_URL", "http://127.0.0.1:5000"),
        description="Where `make ui` / `make mlflow-ui` serve a local store, for run links",
    )

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)

    def check_reachable(self, timeout: float = 5.0) -> None:
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            url, auth = without_userinfo(uri)
            request = urllib.request.Request(
                url.rstrip("/") + "/health", headers={"Authorization": auth} if auth else {}
            )
            try:
                with urllib.request.urlopen(request, timeout=timeout) as resp:
                    if resp.status != 200:
                        raise TrackingUnavailable(f"MLflow tracking server {url} answered {resp.status} on /health")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise TrackingUnavailable(f"MLflow tracking server {url} is unreachable: {redact(exc)}") from None
        elif uri.startswith("sqlite:///"):
            folder = Path(uri[len("sqlite:///") :]).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingUnavailable(f"MLflow store {uri}: cannot create {folder}: {exc}") from exc
            if not os.access(folder, os.W_OK):
                raise TrackingUnavailable(f"MLflow store {uri}: folder {folder} is not writable")
        elif uri.startswith("postgresql"):
            try:
                ensure_database(uri, timeout_s=int(timeout))
            except ValueError as exc:
                raise TrackingUnavailable(f"MLflow store {redact(uri)}: {exc}") from exc

    def experiment_id(self) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        root = self.artifact_root
        if root is None and not self.tracking_uri.startswith(("http://", "https://")):
            root = artifact_root(self.tracking_uri)  # a server chooses its own
        location = Path(root).resolve().as_uri() if root and "://" not in root else root
        try:
            return client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # created by a concurrent run in the meantime?
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run_with(self, tags: dict, params: dict) -> str:
        """A new run in the experiment with ``tags`` (and the code's git commit) and ``params``,
        secrets redacted from both; returns its id."""
        client = self.client()
        tags = {"git.commit": git_commit(), **tags}
        run_id = client.create_run(self.experiment_id(), tags=redact_params(tags)).info.run_id
        for key, value in redact_params(params).items():
            client.log_param(run_id, key, "None" if value is None else str(value)[:250])
        return run_id

    def mark_failed(self, run_id: str, exc: BaseException) -> bool:
        """Tag the run with the error and end it FAILED, quickly; False when the store is not there
        (the training's own error is the one to raise, never this one)."""
        from pipeline.core.tracking_sync import quick_http

        try:
            with quick_http():
                client = self.client()
                client.set_tag(run_id, "medtune.error", redact(exc)[:5000])
                client.set_terminated(run_id, "FAILED")
        except Exception:
            return False
        return True

    def run_link(self, run_id: str, experiment_id: str) -> str:
        """The run's page: on the tracking server, or on `make mlflow-ui` for a local store."""
        base = (
            without_userinfo(self.tracking_uri)[0]
            if self.tracking_uri.startswith(("http://", "https://"))
            else self.ui_url
        )
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def without_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` without ``user:password@`` (never shown, never in a link) and the Basic
    Authorization header it stood for (None when it had none)."""
    import base64

    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


def git_commit() -> str:
    """The project's git commit (tagged on every training run), or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
