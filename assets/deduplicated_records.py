"""Asset ``deduplicated_records``: exact duplicates removed, prompt conflicts and near-duplicate prompts handled
(``pipeline.stages.deduplicated_records``)."""

from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset

from pipeline.core.chunks import head
from pipeline.core.markdown import table
from pipeline.core.records import FIELDS, StagedRows, preview_markdown
from pipeline.stages.deduplicated_records import DedupSettings, deduplicate_to
from resources.data_root import DataRoot


class DeduplicatedRecordsConfig(Config, DedupSettings):
    """What counts as a duplicate or a conflict, and what is done with it
    (declared in ``pipeline.stages.deduplicated_records.DedupSettings``)."""


def near_markdown(groups: list[dict], total: int, limit: int = 20) -> str:
    if not groups:
        return "_no near-duplicate prompts_"
    rows = [(g["rows"], g["kept"], g["similarity"], ", ".join(g["sources"]), g["prompt"]) for g in groups[:limit]]
    if total > limit:
        rows.append(("…", "", "", f"{total - limit} more groups", ""))
    return table(["rows", "kept", "lowest similarity", "sources", "prompt"], rows)


def conflicts_markdown(groups: list[dict], limit: int = 20) -> str:
    if not groups:
        return "_no conflicts_"
    rows = [(g["rows"], g["kept"], ", ".join(g["sources"][:6]), g["prompt"]) for g in groups[:limit]]
    if len(groups) > limit:
        rows.append(("…", "", f"{len(groups) - limit} more groups", ""))
    return table(["rows", "kept", "sources", "prompt"], rows)


@asset(group_name="data", compute_kind="python", description=__doc__)
def deduplicated_records(
    context: AssetExecutionContext,
    config: DeduplicatedRecordsConfig,
    data_root: DataRoot,
    validated_records: StagedRows,
) -> Output[StagedRows]:
    result = deduplicate_to(
        validated_records,
        data_root.stage_dir("deduplicated_records", context.run_id),
        config.conflict_policy,
        data_root.chunk_rows,
        near_duplicate_policy=config.near_duplicate_policy,
        near_duplicate_threshold=config.near_duplicate_threshold,
        log=context.log.info,
    )
    s = result.stats
    context.log.info(
        f"{s['rows_in']} rows in: {s['duplicates_removed']} duplicates removed, {s['conflict_groups']} conflict groups "
        f"({s['conflict_rows']} rows, policy {s['conflict_policy']}, {s['conflicts_rejected']} rejected), "
        f"{s['near_duplicate_groups']} near-duplicate groups ({s['near_duplicate_rows']} rows, policy "
        f"{s['near_duplicate_policy']}, "
        f"{s['near_duplicates_rejected']} rejected), {s['rows_kept']} kept"
    )
    return Output(
        result,
        metadata={
            "rows_in": s["rows_in"],
            "rows_kept": s["rows_kept"],
            "duplicates_removed": s["duplicates_removed"],
            "conflict_policy": s["conflict_policy"],
            "conflict_groups": s["conflict_groups"],
            "conflict_rows": s["conflict_rows"],
            "conflicts_rejected": s["conflicts_rejected"],
            "conflicts": MetadataValue.md(conflicts_markdown(s["conflicts"])),
            "near_duplicate_policy": s["near_duplicate_policy"],
            "near_duplicate_threshold": s["near_duplicate_threshold"],
            "near_duplicate_groups": s["near_duplicate_groups"],
            "near_duplicate_rows": s["near_duplicate_rows"],
            "near_duplicates_rejected": s["near_duplicates_rejected"],
            "near_duplicates": MetadataValue.md(near_markdown(s["near_duplicates"], s["near_duplicate_groups"])),
            "preview": MetadataValue.md(
                preview_markdown(head(result.kept_path), ["record_id", "source_file", "source_line", *FIELDS])
            ),
            "rejected_preview": MetadataValue.md(
                preview_markdown(head(result.rejected_path), ["source_file", "source_line", "reason"], width=100)
            ),
            "stage_output": MetadataValue.path(result.folder),
        },
    )
