"""Where MedTune keeps its data: ``$MEDTUNE_DATA_DIR`` (default ``<project>/data``)."""


import os
from pathlib import Path

from dagster import ConfigurableResource

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV_VAR = "MEDTUNE_DATA_DIR"


def default_data_dir() -> str:
    """``$MEDTUNE_DATA_DIR`` resolved against the working directory, else ``<project>/data``."""
    value = os.environ.get(ENV_VAR)
    return str(Path(value).expanduser().resolve()) if value else str(PROJECT_ROOT / "data")


class DataRoot(ConfigurableResource):
    """The data root and the fixed layout under it.

    ``raw/`` input files · ``processed/`` Parquet outputs and intermediate stages ·
    ``models/`` base models, adapters, merged models.
    """

    path: str

    @property
    def root(self) -> Path:
        return Path(self.path)

    @property
    def raw_dir(self) -> Path:
        return self.root / "raw"

    @property
    def processed_dir(self) -> Path:
        return self.root / "processed"

    @property
    def stages_dir(self) -> Path:
        return self.processed_dir / "stages"

    @property
    def tokenized_dir(self) -> Path:
        return self.processed_dir / "tokenized"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def alpaca_path(self) -> Path:
        return self.processed_dir / "alpaca.parquet"

    @property
    def rejected_path(self) -> Path:
        return self.processed_dir / "rejected.parquet"
