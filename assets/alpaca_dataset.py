"""Asset ``alpaca_dataset``: the clean Alpaca-format Parquet with a stable train/eval split
(``pipeline.stages.alpaca_dataset``).

Written to ``$MEDTUNE_DATA_DIR/processed/runs/<run id>/alpaca.parquet`` (zstd; ``processed/alpaca.parquet``
links to the latest). Checks:
``every_row_accounted_for`` (rows read = rows here + rows in ``rejected_records``),
``no_prompt_in_both_splits`` and ``no_near_twin_across_splits`` (no held-out prompt has a near
duplicate in train, found afresh from the file).
"""

import numpy as np
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

from pipeline.core.atomic import link_latest
from pipeline.core.chunks import count_rows, head, iter_batches
from pipeline.core.fingerprint import sha256_file
from pipeline.core.records import StagedRows, preview_markdown
from pipeline.stages.alpaca_dataset import AlpacaDataset, SplitSettings, near_twins_across_splits, write_alpaca
from pipeline.stages.rejected_records import RejectedRecords
from resources.data_root import DataRoot


class AlpacaDatasetConfig(Config, SplitSettings):
    """The train/eval split's settings
    (declared in ``pipeline.stages.alpaca_dataset.SplitSettings``)."""


@asset(group_name="data", compute_kind="parquet", description=__doc__)
def alpaca_dataset(
    context: AssetExecutionContext, config: AlpacaDatasetConfig, data_root: DataRoot, deduplicated_records: StagedRows
) -> Output[AlpacaDataset]:
    path = data_root.alpaca_path_in(context.run_id)  # this run's own: later steps read exactly these rows
    counts = write_alpaca(deduplicated_records, path, config.eval_fraction, data_root.chunk_rows, log=context.log.info)
    fingerprint = sha256_file(path)
    link_latest(path, data_root.alpaca_path)
    context.log.info(
        f"{counts['rows']} rows written to {path} (train {counts['train']}, eval {counts['eval']}; "
        f"{counts['near_duplicate_groups_kept_together']} near-duplicate groups kept in one split, "
        f"{counts['rows_moved_to_their_group_split']} rows moved to their group's split)"
    )
    return Output(
        AlpacaDataset(
            path=str(path),
            rows=counts["rows"],
            train=counts["train"],
            eval=counts["eval"],
            data_fingerprint=fingerprint,
            near_duplicate_threshold=deduplicated_records.stats.get("near_duplicate_threshold"),
        ),
        metadata={
            "rows": counts["rows"],
            "train_rows": int(counts.get("train", 0)),
            "eval_rows": int(counts.get("eval", 0)),
            "eval_fraction": config.eval_fraction,
            "near_duplicate_groups_kept_together": counts["near_duplicate_groups_kept_together"],
            "rows_moved_to_their_group_split": counts["rows_moved_to_their_group_split"],
            "data_fingerprint": fingerprint,
            "preview": MetadataValue.md(
                preview_markdown(head(path), ["record_id", "split", "instruction", "input", "output"])
            ),
            "path": MetadataValue.path(str(path)),
        },
    )


@asset_check(
    asset=alpaca_dataset,
    additional_ins={"raw_records": AssetIn("raw_records"), "rejected_records": AssetIn("rejected_records")},
    blocking=True,
    description="Every row read is in alpaca.parquet or rejected.parquet, exactly once",
)
def every_row_accounted_for(
    alpaca_dataset: AlpacaDataset, raw_records: StagedRows, rejected_records: RejectedRecords
) -> AssetCheckResult:
    read = raw_records.n_kept + raw_records.n_rejected
    kept = count_rows(alpaca_dataset.path)
    rejected = count_rows(rejected_records.path)
    return AssetCheckResult(
        passed=read == kept + rejected,
        severity=AssetCheckSeverity.ERROR,
        description=f"read {read} = kept {kept} + rejected {rejected}"
        if read == kept + rejected
        else f"read {read} ≠ kept {kept} + rejected {rejected}: {read - kept - rejected} rows unaccounted for",
        metadata={"rows_read": read, "rows_kept": kept, "rows_rejected": rejected},
    )


@asset_check(asset=alpaca_dataset, blocking=True, description="No normalised prompt sits in both train and eval")
def no_prompt_in_both_splits(alpaca_dataset: AlpacaDataset) -> AssetCheckResult:
    keys = {"train": [], "eval": []}
    for table in iter_batches(alpaca_dataset.path, columns=["prompt_id", "split"]):
        ids = table.column("prompt_id").to_pylist()
        splits = table.column("split").to_pylist()
        for split in keys:  # 128-bit prompt keys as two 64-bit halves: 16 bytes a row, any row count
            sel = [p for p, s in zip(ids, splits) if s == split]
            keys[split].append(
                np.array([(int(p[:16], 16), int(p[16:], 16)) for p in sel], dtype=np.uint64).reshape(-1, 2)
            )
    train, held = (np.unique(np.concatenate(keys[s]), axis=0) for s in ("train", "eval"))
    both = np.concatenate([train, held])
    leaks = len(both) - len(np.unique(both, axis=0))
    prompts = len(train) + len(held) - leaks
    return AssetCheckResult(passed=leaks == 0, metadata={"prompts_in_both_splits": leaks, "prompts": prompts})


@asset_check(
    asset=alpaca_dataset,
    blocking=True,
    description=(
        "No held-out prompt has a near duplicate in train (MinHash LSH over the file, as "
        "deduplicated_records finds them)"
    ),
)
def no_near_twin_across_splits(alpaca_dataset: AlpacaDataset) -> AssetCheckResult:
    from pipeline.stages.deduplicated_records import NEAR_THRESHOLD

    threshold = alpaca_dataset.near_duplicate_threshold or NEAR_THRESHOLD
    found = near_twins_across_splits(alpaca_dataset.path, threshold)
    examples = "; ".join(f"eval {a} ~ train {b}" for a, b in found["examples"])
    return AssetCheckResult(
        passed=found["groups"] == 0,
        description="no near twins across splits"
        if not found["groups"]
        else (
            f"{found['held_out_rows']} held-out rows have a near twin in train ({found['groups']} groups), e.g. "
            f"{examples}"
        ),
        metadata={
            "groups_across_splits": found["groups"],
            "held_out_rows_with_twin_in_train": found["held_out_rows"],
            "near_duplicate_threshold": threshold,
        },
    )
