"""Asset ``rejected_records``: every row that did not make it, with file, line, stage and reason.

Written to ``$MEDTUNE_DATA_DIR/processed/rejected.parquet``; the rows of the three data stages
are concatenated in stage order, each stage's rows in source order.
"""


from dagster import AssetExecutionContext, MetadataValue, Output, asset

from pipeline.core.records import StageResult, preview_markdown
from pipeline.stages.alpaca_dataset import write_parquet
from pipeline.stages.rejected_records import collect_rejected, reasons_markdown
from resources.data_root import DataRoot


@asset(group_name="data", compute_kind="parquet", description=__doc__)
def rejected_records(
    context: AssetExecutionContext,
    data_root: DataRoot,
    raw_records: StageResult,
    validated_records: StageResult,
    deduplicated_records: StageResult,
) -> Output[dict]:
    rejected = collect_rejected([raw_records.rejected, validated_records.rejected, deduplicated_records.rejected])
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
