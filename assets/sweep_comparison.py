"""Asset ``sweep_comparison``: the latest sweep's trials side by side (``pipeline.stages.sweep_comparison``).

A table (held-out loss against the base, medicine-choice accuracy, trainable parameters, adapter
size, training time, peak memory; failed and not-yet-run trials listed as such) and bar charts,
in this asset's metadata and on the sweep's MLflow parent run (CSV, Markdown, PNG; the best
trial's figures as metrics). The parent run is marked finished.
"""

import base64

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from assets.sweep_plan import read_plan, sweep_dir
from pipeline.core.atomic import atomic_dir
from pipeline.stages.sweep_comparison import (
    SweepComparison,
    best_trial,
    comparison_plot,
    comparison_table,
    table_markdown,
)
from pipeline.stages.sweep_plan import SweepPlan
from pipeline.stages.sweep_trial import read_records
from resources.data_root import DataRoot
from resources.mlflow_tracking import MlflowTracking


@asset(group_name="sweep", compute_kind="pandas", description=__doc__, deps=["sweep_trial"])
def sweep_comparison(
    context: AssetExecutionContext, data_root: DataRoot, mlflow: MlflowTracking, sweep_plan: SweepPlan
) -> Output[SweepComparison]:
    name = sweep_plan.name
    plan = read_plan(data_root, name)
    folder = sweep_dir(data_root, name)
    records = [
        r
        if r.get("status") == "pending" or r.get("settings") == plan["trials"][r["label"]]
        else {"label": r["label"], "status": "pending"}  # a record from an earlier plan's trial of that name
        for r in read_records(folder, list(plan["trials"]))
    ]
    from assets.lora_adapter import LoraAdapterConfig

    table = comparison_table(records, LoraAdapterConfig().model_dump())
    png = comparison_plot(table)
    best = best_trial(table)
    md = table_markdown(table)
    out = folder / "comparison"
    with atomic_dir(out) as tmp:
        table.to_csv(tmp / "comparison.csv", index=False)
        (tmp / "comparison.md").write_text(md)
        (tmp / "comparison.png").write_bytes(png)
    counts = table["status"].value_counts().to_dict()
    parent = plan["parent_run_id"]
    client = mlflow.client()
    for f in ("comparison.csv", "comparison.md", "comparison.png"):
        client.log_artifact(parent, str(out / f), "comparison")
    if best:
        row = table[table["trial"] == best].iloc[0]
        client.set_tag(parent, "medtune.best_trial", best)
        client.log_metric(parent, "best_eval_loss", float(row["eval_loss"]))
    client.set_tag(parent, "medtune.trials", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    client.set_terminated(parent, "FINISHED")
    context.log.info(f"sweep {name}: {counts}; best held-out loss: {best}")
    exp_id = client.get_run(parent).info.experiment_id
    return Output(
        SweepComparison(name, str(out), best, counts),
        metadata={
            "sweep": name,
            "comparison": MetadataValue.md(md),
            "plots": MetadataValue.md(f"![comparison](data:image/png;base64,{base64.b64encode(png).decode()})"),
            "best_trial": best or "",
            "finished": int(counts.get("finished", 0)),
            "failed": int(counts.get("failed", 0)),
            "pending": int(counts.get("pending", 0)),
            "path": MetadataValue.path(str(out)),
            "mlflow_parent_run": MetadataValue.url(mlflow.run_link(parent, exp_id)),
        },
    )
