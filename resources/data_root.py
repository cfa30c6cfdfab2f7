"""Where MedTune keeps its data: ``$MEDTUNE_DATA_DIR`` (default ``<project>/data``)."""

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "MEDTUNE_DATA_DIR"


def default_data_dir() -> str:
    """``$MEDTUNE_DATA_DIR`` resolved against the working directory, else ``<project>/data``."""
    value = os.environ.get(ENV_VAR)
    return str(Path(value).expanduser().resolve()) if value else str(PROJECT_ROOT / "data")


class PathOutsideDataRoot(ValueError):
    """A path from config points outside the data root (and that is not allowed)."""


class DataRoot(ConfigurableResource):
    """The data root and the fixed layout under it.

    ``raw/`` input files · ``processed/runs/<run id>/`` each run's data outputs, written once ·
    ``processed/stages/`` the latest descriptors · ``processed/tokenized/`` token cache ·
    ``models/`` base models, adapters, merged models.
    """

    path: str
    chunk_rows: int = Field(
        100_000,
        gt=0,
        description="Rows the data stages hold in memory at once (they stream; memory does not grow with the data)",
    )

    def setup_for_execution(self, context) -> None:
        """Tag the run with this host as its first step starts (every asset but the sweep's plan
        uses the data root): on a shared instance ``pipeline.ops.recover`` judges a run by its host,
        a run that died in its first step included."""
        from pipeline.core.stores import RUN_HOST_TAG, tag_run_host

        run, instance = context.dagster_run, context.instance
        if run is not None and instance is not None and RUN_HOST_TAG not in run.tags:
            tag_run_host(instance, run.run_id, context.log.warning if context.log else (lambda message: None))

    @property
    def root(self) -> Path:
        return Path(self.path)

    def confine(self, value: str, setting: str, allow_outside: bool = False) -> Path:
        """A path given in config, resolved (relative to the data root, symlinks followed) and
        refused with :class:`PathOutsideDataRoot` when it lands outside the data root, unless the
        config explicitly allows it (``allow_outside``)."""
        raw = Path(value).expanduser()
        lexical = Path(os.path.normpath(raw if raw.is_absolute() else self.root / raw))
        resolved = lexical.resolve()
        root = self.root.resolve()
        if not allow_outside and not resolved.is_relative_to(root):
            via = (
                f" (a symlink: it resolves to {resolved})"
                if lexical.is_relative_to(self.root) or lexical.is_relative_to(root)
                else ""
            )
            raise PathOutsideDataRoot(
                f"{setting}: {value!r} is outside the data root {root}{via}. Put it under the data root, "
                "or set allow_outside_paths: true in this asset's config to use a path elsewhere."
            )
        return resolved

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def processed_dir(self) -> Path:
        return self.root / "processed"

    @property
    def runs_dir(self) -> Path:
        """One folder per Dagster run that wrote data (docs/reliability.md#one-run-one-set-of-data):
        never rewritten, so a run reads exactly what its upstream steps wrote."""
        return self.processed_dir / "runs"

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"not a run id: {run_id!r}")
        return self.runs_dir / run_id

    def stage_dir(self, asset: str, run_id: str) -> Path:
        """Where a data stage's rows lie in one run (``kept.arrow``, ``rejected.arrow``, ``stats.json``)."""
        return self.run_dir(run_id) / asset

    def alpaca_path_in(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "alpaca.parquet"

    def rejected_path_in(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "rejected.parquet"

    @property
    def raw_digests_path(self) -> Path:
        """The raw files' sha256 by their stat, so that an unchanged file is not read again."""
        return self.processed_dir / "raw_digests.json"

    @property
    def stages_dir(self) -> Path:
        """The latest descriptor of each asset (``<asset>.json``), for people and ``make ask``."""
        return self.processed_dir / "stages"

    @property
    def tokenized_dir(self) -> Path:
        return self.processed_dir / "tokenized"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def alpaca_path(self) -> Path:
        """The latest run's Alpaca Parquet (a hard link to it): for people; the pipeline hands on its own run's."""
        return self.processed_dir / "alpaca.parquet"

    @property
    def rejected_path(self) -> Path:
        """The latest run's rejected rows (a hard link), as ``alpaca_path``."""
        return self.processed_dir / "rejected.parquet"
