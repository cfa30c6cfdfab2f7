"""Print what the last materialization produced: ``python -m pipeline.ops.summary`` (used by ``make run``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from pipeline.core.records import STATS_FILE
from pipeline.core.secrets import redact
from resources.data_root import DataRoot, default_data_dir
from resources.mlflow_tracking import default_tracking_uri
from resources.stage_io import STAGED


def summary(data_dir: str | None = None) -> str:
    root = DataRoot(path=data_dir or default_data_dir())
    out = [f"MedTune summary for {root.root}"]
    stages = root.stages_dir
    pointer = stages / "raw_records.json"  # the latest run's stage folder (resources/stage_io.py)
    raw = Path(json.loads(pointer.read_text()).get(STAGED, "")) / STATS_FILE if pointer.is_file() else None
    if raw is None or not raw.is_file():
        return "nothing materialized yet: run `make run`"
    s = json.loads(raw.read_text())
    out.append(f"  files read          {s['files_read']} ({s['files_rejected']} rejected whole)")
    out.append(f"  rows read           {s['rows_read']}")
    if root.alpaca_path.is_file():
        alpaca = pd.read_parquet(root.alpaca_path, columns=["split"])
        counts = alpaca["split"].value_counts().to_dict()
        out.append(
            f"  rows kept           {len(alpaca)} (train {counts.get('train', 0)}, eval {counts.get('eval', 0)})"
        )
    if root.rejected_path.is_file():
        rejected = pd.read_parquet(root.rejected_path, columns=["stage"])
        by_stage = ", ".join(f"{k} {v}" for k, v in rejected["stage"].value_counts().sort_index().items())
        out.append(f"  rows rejected       {len(rejected)} ({by_stage or 'none'})")
    out += _model_lines(stages) + _result_lines(stages)
    out.append(f"  alpaca parquet      {root.alpaca_path}")
    out.append(f"  rejected parquet    {root.rejected_path}")
    return "\n".join(out)


def _model_lines(stages: Path) -> list[str]:
    """The base model, the tokenized data and the training, as the latest descriptors tell."""
    out: list[str] = []
    base = stages / "base_model.json"
    if base.is_file():
        b = json.loads(base.read_text())
        out.append(f"  base model          {b['model']} ({b['n_params']:,} parameters) at {b['path']}")
    tok = stages / "tokenized_dataset.json"
    if tok.is_file():
        t = json.loads(tok.read_text())
        st = t["stats"]
        out.append(
            f"  tokenized           {st['rows']} rows, length p50 {st['length_p50']:.0f} / p95 "
            f"{st['length_p95']:.0f} / "
            f"max {st['length_max']}, {st['truncated_rows']} truncated, supervised share {st['supervised_share']:.1%}"
        )
        out.append(f"                      {t['path']}")
    lora = stages / "lora_adapter.json"
    if lora.is_file():
        written = json.loads(lora.read_text())
        a = {**written, **written.get("figures", {})}  # the training's figures beside the adapter's fields
        first, final = a.get("first_eval_loss"), a.get("final_eval_loss")
        losses = f"eval loss {first:.4f} → {final:.4f}" if first is not None and final is not None else ""
        out.append(
            f"  training            {a.get('steps')} steps in {a.get('train_seconds')} s on {a.get('device')} "
            f"({a.get('precision')}), {losses}"
        )
        if a.get("steady_tokens_per_s"):
            out.append(
                f"                      {a['steady_tokens_per_s']:,.0f} tokens/s, {a.get('achieved_tflops')} "
                "TFLOP/s of a "
                f"{a.get('matmul_peak_tflops')} TFLOP/s matmul peak (MFU {a.get('mfu')})"
            )
        out.append(f"  adapter             {a['path']}")
        out.append(
            f"  MLflow run          {a.get('mlflow_run_id')}  (make mlflow-ui; store {redact(default_tracking_uri())})"
        )
    return out


def _result_lines(stages: Path) -> list[str]:
    """Base against tuned, the merge and its check, the registration."""
    out: list[str] = []
    report = stages / "evaluation_report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        out.append(
            "  base vs tuned       (answer-token loss; medicine choice by likelihood: top-1 accuracy and mean rank;"
        )
        out.append("                      BLEU-4 on characters, ROUGE on jieba words, 0-100)")
        out.extend("    " + line for line in _metrics_table(r["summary"]))
        out.append(f"  tuned_beats_base    {'passed' if r['gate_passed'] else 'FAILED'}: {r['gate_reason']}")
    merged = stages / "merged_model.json"
    if merged.is_file():
        m = json.loads(merged.read_text())
        v = m["verification"]
        if m.get("mergeable") is False:
            out.append(f"  merged model        none: {m['reason']}")
        else:
            out.append(f"  merged model        {m['path']}")
        if v.get("applicable", True):
            from assets.merged_model import describe_check

            out.append(f"  merged_matches_adapter {'passed' if v['passed'] else 'FAILED'}: {describe_check(v)}")
    reg = stages / "registered_model.json"
    if reg.is_file():
        g = json.loads(reg.read_text())
        if g.get("registered"):
            out.append(
                f"  registered          {g['name']} version {g['version']} (aliases: "
                f"{', '.join(g['aliases']) or 'none'}); "
                f"load it with mlflow.pyfunc.load_model('models:/{g['name']}@champion')"
            )
        else:
            out.append(f"  registered          NOT registered: {g.get('reason')}")
    return out


def _metrics_table(summary: dict) -> list[str]:
    cols = ["loss", "choice_accuracy", "choice_rank", "bleu_4", "rouge_l", "name_hit_rate"]
    lines = [f"{'split':<13}{'model':<7}{'rows':>5}" + "".join(f"{c:>16}" for c in cols)]
    for split in ("eval", "train_sample"):
        for model in ("base", "tuned"):
            s = summary.get(model, {}).get(split)
            if not s:
                continue
            cells = "".join(
                f"{'n/a' if s.get(c) is None else format(s[c], '.4f' if c == 'loss' else '.2f'):>16}" for c in cols
            )
            lines.append(f"{split:<13}{model:<7}{s['rows']:>5}{cells}")
            if split == "eval" and s.get("seen_medicine_choice_rows"):
                lines.append(
                    f"{'':<13}{'':<7}{'':>5}  choice accuracy on the {s['seen_medicine_choice_rows']} eval rows whose "
                    f"medicine is trained on: {s['seen_medicine_choice_accuracy']:.2f}"
                )
    return lines


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else None))
