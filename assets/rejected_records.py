"""Asset ``rejected_records``: every row that did not make it, with file, line, stage and reason.

Written to ``$MEDTUNE_DATA_DIR/processed/rejected.parquet``; the rows of the three data stages
are concatenated in stage order, each stage's rows in source order.
"""


import pandas as pd
from dagster import AssetExecutionContext, MetadataValue, Output, asset

from pipeline.records import StageResult, preview_markdown, rejects_frame
from pipeline.split import write_parquet
from resources.data_root import DataRoot


def reasons_markdown(rejected: pd.DataFrame, limit: int = 15) -> str:
    if rejected.empty:
        return "_nothing rejected_"
    # group reasons by their general form: the text before the first ':' or '(' of each part
    kinds = rejected["reason"].str.replace(r" \(.*$| of .*:\d+.*$", "", regex=True).str.slice(0, 90)
    table = (
        pd.DataFrame({"stage": rejected["stage"], "reason": kinds})
        .value_counts()
        .reset_index(name="rows")
        .head(limit)
    )
    lines = ["| stage | reason | rows |", "|---|---|---|"]
    for stage, reason, rows in table.itertuples(index=False, name=None):
        lines.append(f"| {stage} | {str(reason).replace('|', '/')} | {rows} |")
    return "\n".join(lines)


@asset(group_name="data", compute_kind="parquet", description=__doc__)
def rejected_records(
    context: AssetExecutionContext,
    data_root: DataRoot,
    raw_records: StageResult,
    validated_records: StageResult,
    deduplicated_records: StageResult,
) -> Output[dict]:
    parts = [raw_records.rejected, validated_records.rejected, deduplicated_records.rejected]
    rejected = pd.concat([rejects_frame(), *parts], ignore_index=True).astype(rejects_frame().dtypes.to_dict())
    path = write_parquet(rejected, data_root.rejected_path)
    by_stage = rejected["stage"].value_counts().to_dict()
    context.log.info(f"{len(rejected)} rejected rows written to {path}: {by_stage}")
    return Output(
        {"path": str(path), "rows": len(rejected), "by_stage": by_stage},
        metadata={
            "rows": len(rejected),
            **{f"rows_{stage}": int(by_stage.get(stage, 0)) for stage in ("ingest", "validate", "dedup")},
            "reasons": MetadataValue.md(reasons_markdown(rejected)),
            "preview": MetadataValue.md(
                preview_markdown(rejected, ["source_file", "source_line", "stage", "reason"], n=10, width=90)
            ),
            "path": MetadataValue.path(str(path)),
        },
    )
