"""MLflow tracking as a Dagster resource (a ``ConfigurableResource``, not the old function-style
dagster-mlflow resource). Default store: SQLite in the project's ``mlflow/`` folder."""

import os
import urllib.error
import urllib.request
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from pipeline.core.secrets import redact
from pipeline.core.stores import DEFAULT_SQLITE_URI as DEFAULT_URI
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
        None, description="Artifact location for a new experiment (default: MEDTUNE_ARTIFACT_ROOT, else mlflow/artifacts)")
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
            try:
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                    if resp.status != 200:
                        raise TrackingUnavailable(f"MLflow tracking server {uri} answered {resp.status} on /health")
            except (urllib.error.URLError, OSError) as exc:
                raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
        elif uri.startswith("sqlite:///"):
            folder = Path(uri[len("sqlite:///"):]).parent
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

    def run_link(self, run_id: str, experiment_id: str) -> str:
        """The run's page: on the tracking server, or on `make mlflow-ui` for a local store."""
        base = self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else self.ui_url
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
