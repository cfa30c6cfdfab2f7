"""Asset ``validated_records``: the Great Expectations suite over ingested rows (``pipeline.stages.validated_records``).

Its blocking check ``reject_ratio_within_limit`` stops the run when the share of rows rejected
so far (ingest + validation) is over ``max_reject_ratio`` or no valid row is left.
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from pipeline.core.chunks import head
from pipeline.core.records import FIELDS, StagedRows, preview_markdown
from pipeline.stages.validated_records import Bounds, validate_to
from resources.data_root import DataRoot

CHECK = "reject_ratio_within_limit"


class ValidatedRecordsConfig(Config, Bounds):
    """The length bounds (declared in ``pipeline/stages/validated_records.py``) and the share of
    rejected rows the run tolerates."""

    max_reject_ratio: float = Field(
        0.2, ge=0, le=1, description="Fail the run when more than this share of rows read is rejected"
    )


@asset(
    group_name="data",
    compute_kind="great_expectations",
    description=__doc__,
    check_specs=[
        AssetCheckSpec(
            CHECK,
            asset="validated_records",
            blocking=True,
            description="Rejected share of rows read ≤ max_reject_ratio, and some valid row left",
        )
    ],
)
def validated_records(
    context: AssetExecutionContext, config: ValidatedRecordsConfig, data_root: DataRoot, raw_records: StagedRows
):
    bounds = Bounds(**config.model_dump(include=set(Bounds.model_fields)))
    result = validate_to(
        raw_records,
        data_root.stage_dir("validated_records", context.run_id),
        bounds,
        data_root.chunk_rows,
        log=context.log.info,
    )
    n_read = raw_records.n_kept + raw_records.n_rejected
    n_rejected = raw_records.n_rejected + result.n_rejected
    ratio = n_rejected / n_read if n_read else 1.0
    failed = [o for o in result.stats["expectations"] if not o["success"]]
    context.log.info(
        f"validated {raw_records.n_kept} rows: {result.n_kept} pass, {result.n_rejected} fail ({len(failed)} "
        "expectations with failures)"
    )
    yield Output(
        result,
        metadata={
            "rows_in": raw_records.n_kept,
            "rows_kept": result.n_kept,
            "rows_rejected": result.n_rejected,
            "expectations": MetadataValue.md(result.stats["report_markdown"]),
            "preview": MetadataValue.md(
                preview_markdown(head(result.kept_path), ["source_file", "source_line", *FIELDS])
            ),
            "rejected_preview": MetadataValue.md(
                preview_markdown(head(result.rejected_path), ["source_file", "source_line", "reason"], width=100)
            ),
            "stage_output": MetadataValue.path(result.folder),
        },
    )
    passed = ratio <= config.max_reject_ratio and result.n_kept > 0
    why = (
        "no valid row is left"
        if result.n_kept == 0
        else f"{ratio:.1%} of rows read were rejected, over max_reject_ratio {config.max_reject_ratio:.0%}"
        if not passed
        else f"{ratio:.1%} rejected (limit {config.max_reject_ratio:.0%})"
    )
    yield AssetCheckResult(
        check_name=CHECK,
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        description=why,
        metadata={
            "rows_read": n_read,
            "rows_rejected_so_far": n_rejected,
            "reject_ratio": round(ratio, 4),
            "max_reject_ratio": config.max_reject_ratio,
            "rows_valid": result.n_kept,
        },
    )
