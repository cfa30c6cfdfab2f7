"""Asset ``rejected_records``: every row that did not make it, with file, line, stage and reason.

Written to ``$MEDTUNE_DATA_DIR/processed/runs/<run id>/rejected.parquet`` (``processed/rejected.parquet``
links to the latest); the rows of the three data stages
are concatenated in stage order, each stage's rows in source order.
"""

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from pipeline.core.atomic import link_latest
from pipeline.core.chunks import head
from pipeline.core.records import StagedRows, preview_markdown
from pipeline.stages.rejected_records import RejectedRecords, write_rejected
from resources.data_root import DataRoot


@asset(group_name="data", compute_kind="parquet", description=__doc__)
def rejected_records(
    context: AssetExecutionContext,
    data_root: DataRoot,
    raw_records: StagedRows,
    validated_records: StagedRows,
    deduplicated_records: StagedRows,
) -> Output[RejectedRecords]:
    path = data_root.rejected_path_in(context.run_id)
    written = write_rejected(
        [raw_records, validated_records, deduplicated_records], path, data_root.chunk_rows, log=context.log.info
    )
    link_latest(path, data_root.rejected_path)
    by_stage = written["by_stage"]
    context.log.info(f"{written['rows']} rejected rows written to {path}: {by_stage}")
    return Output(
        RejectedRecords(path=str(path), rows=written["rows"], by_stage=by_stage),
        metadata={
            "rows": written["rows"],
            **{f"rows_{stage}": int(by_stage.get(stage, 0)) for stage in ("ingest", "validate", "dedup")},
            "reasons": MetadataValue.md(written["reasons"]),
            "preview": MetadataValue.md(
                preview_markdown(head(path, 10), ["source_file", "source_line", "stage", "reason"], n=10, width=90)
            ),
            "path": MetadataValue.path(str(path)),
        },
    )
