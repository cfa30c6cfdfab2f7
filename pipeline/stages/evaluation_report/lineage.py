"""Whether an adapter is being scored against the rows it trained on.

Each run hands its own files down (resources/stage_io.py), yet a step can still be given an
adapter and data of different lineages: a Materialize of ``evaluation_report`` alone after new data
arrived, or a file changed by hand. The evaluation refuses such a pair, naming both sides, instead
of scoring (and caching, and gating the registry on) a figure about other rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.fingerprint import sha256_file
from pipeline.stages.lora_adapter.spec import TRAINING_RECORD


class LineageError(ValueError):
    """The adapter, the tokenized rows and the Alpaca file are not one lineage; the message says where."""


def check_lineage(
    alpaca_path: str, alpaca_fingerprint: str, tokenized_path: str, tokenized_manifest: dict, adapter_path: str
) -> None:
    """Raise :class:`LineageError` unless the Alpaca file holds the content its fingerprint names,
    the tokenized rows were made from it, and the adapter was trained on those tokenized rows."""
    actual = sha256_file(alpaca_path)
    if actual != alpaca_fingerprint:
        raise LineageError(
            f"{alpaca_path} changed after it was written: fingerprint {actual[:12]}, not {alpaca_fingerprint[:12]}"
        )
    made_from = tokenized_manifest.get("data_fingerprint")
    if made_from != alpaca_fingerprint:
        raise LineageError(
            f"the tokenized rows at {tokenized_path} were made from data {str(made_from)[:12]}, not from "
            f"{alpaca_path} ({alpaca_fingerprint[:12]}): materialize tokenized_dataset and lora_adapter again"
        )
    record = Path(adapter_path) / TRAINING_RECORD
    trained_on = json.loads(record.read_text())["spec"].get("tokenized_path") if record.is_file() else None
    if trained_on is not None and Path(trained_on).name != Path(tokenized_path).name:
        raise LineageError(
            f"adapter {Path(adapter_path).name} was trained on tokenized rows {Path(trained_on).name}, not on "
            f"{Path(tokenized_path).name} (data {alpaca_fingerprint[:12]}): materialize lora_adapter again"
        )
