"""Asset ``alpaca_dataset``: the clean Alpaca-format Parquet with a stable train/eval split (``pipeline.stages.alpaca_dataset``).

Written to ``$MEDTUNE_DATA_DIR/processed/alpaca.parquet`` (zstd). Checks:
``every_row_accounted_for`` (rows read = rows here + rows in ``rejected_records``) and
``no_prompt_in_both_splits``.
"""


import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetIn,
    Config,
    MetadataValue,
    Output,
    asset,
    asset_check,
)
from pydantic import Field

from pipeline.core.fingerprint import sha256_file
from pipeline.core.records import StageResult, preview_markdown
from pipeline.stages.alpaca_dataset import build_alpaca, write_parquet
from resources.data_root import DataRoot


class AlpacaDatasetConfig(Config):
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation")


@asset(group_name="data", compute_kind="parquet", description=__doc__)
def alpaca_dataset(
    context: AssetExecutionContext, config: AlpacaDatasetConfig, data_root: DataRoot, deduplicated_records: StageResult
) -> Output[dict]:
    table = build_alpaca(deduplicated_records.kept, config.eval_fraction)
    path = write_parquet(table, data_root.alpaca_path)
    fingerprint = sha256_file(path)
    counts = table["split"].value_counts().to_dict()
    context.log.info(f"{len(table)} rows written to {path} (train {counts.get('train', 0)}, eval {counts.get('eval', 0)})")
    return Output(
        {"path": str(path), "rows": len(table), "train": int(counts.get("train", 0)),
         "eval": int(counts.get("eval", 0)), "data_fingerprint": fingerprint},
        metadata={
            "rows": len(table),
            "train_rows": int(counts.get("train", 0)),
            "eval_rows": int(counts.get("eval", 0)),
            "eval_fraction": config.eval_fraction,
            "data_fingerprint": fingerprint,
            "preview": MetadataValue.md(preview_markdown(table, ["record_id", "split", "instruction", "input", "output"])),
            "path": MetadataValue.path(str(path)),
        },
    )


@asset_check(
    asset=alpaca_dataset,
    additional_ins={"raw_records": AssetIn("raw_records"), "rejected_records": AssetIn("rejected_records")},
    blocking=True,
    description="Every row read is in alpaca.parquet or rejected.parquet, exactly once",
)
def every_row_accounted_for(alpaca_dataset: dict, raw_records: StageResult, rejected_records: dict) -> AssetCheckResult:
    read = len(raw_records.kept) + len(raw_records.rejected)
    kept = len(pd.read_parquet(alpaca_dataset["path"], columns=["record_id"]))
    rejected = len(pd.read_parquet(rejected_records["path"], columns=["stage"]))
    return AssetCheckResult(
        passed=read == kept + rejected,
        severity=AssetCheckSeverity.ERROR,
        description=f"read {read} = kept {kept} + rejected {rejected}" if read == kept + rejected
        else f"read {read} ≠ kept {kept} + rejected {rejected}: {read - kept - rejected} rows unaccounted for",
        metadata={"rows_read": read, "rows_kept": kept, "rows_rejected": rejected},
    )


@asset_check(asset=alpaca_dataset, blocking=True, description="No normalised prompt sits in both train and eval")
def no_prompt_in_both_splits(alpaca_dataset: dict) -> AssetCheckResult:
    df = pd.read_parquet(alpaca_dataset["path"], columns=["prompt_id", "split"])
    both = df.groupby("prompt_id")["split"].nunique()
    leaks = int((both > 1).sum())
    return AssetCheckResult(passed=leaks == 0, metadata={"prompts_in_both_splits": leaks, "prompts": len(both)})
