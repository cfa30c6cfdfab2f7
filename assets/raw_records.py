"""Asset ``raw_records``: every raw JSON / JSON Lines file read into rows (``pipeline.stages.raw_records``)."""

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from pipeline.core.chunks import head
from pipeline.core.records import FIELDS, StagedRows, preview_markdown
from pipeline.stages.raw_records import ingest_to, raw_fingerprint
from resources.data_root import DataRoot


def files_markdown(files: list[dict]) -> str:
    from pipeline.core.markdown import table

    rows = []
    for f in files:
        notes = "; ".join([*(f.get("notes") or []), *([f"**rejected**: {f['error']}"] if f.get("error") else [])])
        if f.get("blank_lines"):
            notes = "; ".join(filter(None, [notes, f"{f['blank_lines']} blank lines skipped"]))
        rows.append(
            [
                f["source_file"],
                f.get("encoding"),
                f.get("format"),
                f["rows_read"],
                f["rows_kept"],
                f["rows_rejected"],
                notes,
            ]
        )
    return table(["file", "encoding", "format", "read", "kept", "rejected", "notes"], rows)


@asset(group_name="data", compute_kind="python", description=__doc__)
def raw_records(context: AssetExecutionContext, data_root: DataRoot) -> Output[StagedRows]:
    result = ingest_to(
        data_root.raw_dir,
        data_root.stage_dir("raw_records", context.run_id),
        data_root.chunk_rows,
        log=context.log.info,
    )
    s = result.stats
    context.log.info(
        f"read {s['files_read']} files from {data_root.raw_dir}: {s['rows_read']} rows, {s['rows_kept']} kept, "
        f"{s['rows_rejected']} rejected"
    )
    for f in s["files"]:
        if f.get("error"):
            context.log.warning(f"{f['source_file']}: file rejected: {f['error']}")
    return Output(
        result,
        metadata={
            "rows_read": s["rows_read"],
            "rows_kept": s["rows_kept"],
            "rows_rejected": s["rows_rejected"],
            "files_read": s["files_read"],
            "files_rejected": s["files_rejected"],
            "files": MetadataValue.md(files_markdown(s["files"])),
            "preview": MetadataValue.md(
                preview_markdown(head(result.kept_path), ["source_file", "source_line", *FIELDS])
            ),
            "rejected_preview": MetadataValue.md(
                preview_markdown(head(result.rejected_path), ["source_file", "source_line", "reason"], width=100)
            ),
            "stage_output": MetadataValue.path(result.folder),
            "raw_dir": MetadataValue.path(str(data_root.raw_dir)),
            # the content fingerprint raw_data_sensor compares with (paths + content hashes)
            "raw_fingerprint": raw_fingerprint(data_root.raw_dir, data_root.raw_digests_path),
        },
    )
