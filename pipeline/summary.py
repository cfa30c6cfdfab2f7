"""Print what the last materialization produced: ``python -m pipeline.summary`` (used by ``make run``)."""

from __future__ import annotations

import json
import sys

import pandas as pd

from resources.data_root import DataRoot, default_data_dir


def summary(data_dir: str | None = None) -> str:
    root = DataRoot(path=data_dir or default_data_dir())
    out = [f"MedTune summary for {root.root}"]
    stages = root.stages_dir
    raw = stages / "raw_records" / "stats.json"
    if not raw.is_file():
        return "nothing materialized yet: run `make run`"
    s = json.loads(raw.read_text())
    out.append(f"  files read          {s['files_read']} ({s['files_rejected']} rejected whole)")
    out.append(f"  rows read           {s['rows_read']}")
    if root.alpaca_path.is_file():
        alpaca = pd.read_parquet(root.alpaca_path, columns=["split"])
        counts = alpaca["split"].value_counts().to_dict()
        out.append(f"  rows kept           {len(alpaca)} (train {counts.get('train', 0)}, eval {counts.get('eval', 0)})")
    if root.rejected_path.is_file():
        rejected = pd.read_parquet(root.rejected_path, columns=["stage"])
        by_stage = ", ".join(f"{k} {v}" for k, v in rejected["stage"].value_counts().sort_index().items())
        out.append(f"  rows rejected       {len(rejected)} ({by_stage or 'none'})")
    base = stages / "base_model.json"
    if base.is_file():
        b = json.loads(base.read_text())
        out.append(f"  base model          {b['model']} ({b['n_params']:,} parameters) at {b['path']}")
    tok = stages / "tokenized_dataset.json"
    if tok.is_file():
        t = json.loads(tok.read_text())
        st = t["stats"]
        out.append(
            f"  tokenized           {st['rows']} rows, length p50 {st['length_p50']:.0f} / p95 {st['length_p95']:.0f} / "
            f"max {st['length_max']}, {st['truncated_rows']} truncated, supervised share {st['supervised_share']:.1%}"
        )
        out.append(f"                      {t['path']}")
    lora = stages / "lora_adapter.json"
    if lora.is_file():
        a = json.loads(lora.read_text())
        first, final = a.get("first_eval_loss"), a.get("final_eval_loss")
        losses = f"eval loss {first:.4f} → {final:.4f}" if first is not None and final is not None else ""
        out.append(
            f"  training            {a.get('steps')} steps in {a.get('train_seconds')} s on {a.get('device')} "
            f"({a.get('precision')}), {losses}"
        )
        out.append(f"  adapter             {a['path']}")
        out.append(f"  MLflow run          {a.get('mlflow_run_id')}  (make mlflow-ui, or mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db)")
    out.append(f"  alpaca parquet      {root.alpaca_path}")
    out.append(f"  rejected parquet    {root.rejected_path}")
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else None))
