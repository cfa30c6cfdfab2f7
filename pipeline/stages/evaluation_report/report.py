"""What the evaluation reports: the registry gate (tuned against base on held-out rows) and the
Markdown tables the asset shows (the summary, the side-by-side answers)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

MODELS = ("base", "tuned")
SPLITS = ("eval", "train_sample")

# the gate calls a fall in held-out medicine-choice accuracy real when a one-sided sign test on the
# rows where the two models disagree puts it below this (the rows are few: 5 to 7 in our data sets)
CHOICE_SIGNIFICANCE = 0.05


def sign_test_p(against: int, for_: int) -> float:
    """One-sided exact sign test: the chance of at least ``against`` of ``against + for_`` paired
    disagreements going one way when each way is equally likely."""
    n = against + for_
    return sum(math.comb(n, k) for k in range(against, n + 1)) / 2**n if n else 1.0


def tuned_beats_base(summary: dict[str, dict[str, dict[str, Any]]]) -> tuple[bool, str]:
    """The registry gate, on held-out rows: the tuned model's answer loss below the base model's,
    its ROUGE-L not lower, and its medicine-choice accuracy (where the data names medicines) not
    lower beyond chance. Choice is right or wrong per row on a handful of rows, so a fall counts
    when the rows only the base model gets right outnumber those only the tuned model gets right
    by more than chance (one-sided sign test, p < ``CHOICE_SIGNIFICANCE``): one lucky pick of the
    base model among 7 held-out rows does not block a model. A summary without the paired counts
    (an evaluation kept from before them) is judged strictly, as it was."""
    try:
        b, t = summary["base"]["eval"], summary["tuned"]["eval"]
    except KeyError:
        return False, "no eval rows: the tuned model cannot be compared with the base model"
    reasons, said = [], [f"eval loss {b['loss']:.4f} → {t['loss']:.4f}"]
    if not t["loss"] < b["loss"]:
        reasons.append(f"eval loss did not go down (tuned {t['loss']:.4f} vs base {b['loss']:.4f})")
    if b.get("choice_accuracy") is not None and t.get("choice_accuracy") is not None:
        said.append(f"choice accuracy {b['choice_accuracy']:.2f} → {t['choice_accuracy']:.2f}")
        if t["choice_accuracy"] < b["choice_accuracy"]:
            against, for_ = t.get("choice_only_base_right"), t.get("choice_only_tuned_right")
            went_down = (
                f"eval medicine-choice accuracy went down (tuned {t['choice_accuracy']:.2f} vs base "
                f"{b['choice_accuracy']:.2f})"
            )
            if against is None or for_ is None:
                reasons.append(went_down)
            else:
                p = sign_test_p(against, for_)
                pairs = (
                    f"{against} row(s) only the base model picks right, {for_} only the tuned one (sign test p {p:.2f})"
                )
                if p < CHOICE_SIGNIFICANCE:
                    reasons.append(f"{went_down}: {pairs}")
                else:
                    said[-1] += f", lower within chance: {pairs}"
    said.append(f"ROUGE-L {b['rouge_l']:.2f} → {t['rouge_l']:.2f}")
    if t["rouge_l"] < b["rouge_l"]:
        reasons.append(f"eval ROUGE-L went down (tuned {t['rouge_l']:.2f} vs base {b['rouge_l']:.2f})")
    if reasons:
        return False, "; ".join(reasons)
    return True, ", ".join(said)


def summary_markdown(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    cols = [
        "loss",
        "perplexity",
        "choice_accuracy",
        "choice_rank",
        "seen_medicine_choice_accuracy",
        "bleu_4",
        "rouge_1",
        "rouge_2",
        "rouge_l",
        "name_hit_rate",
    ]
    from pipeline.core.markdown import table

    rows = []
    for split in SPLITS:
        for model in MODELS:
            s = summary.get(model, {}).get(split)
            if not s:
                continue
            vals = [
                "n/a"
                if s.get(c) is None
                else (f"{s[c]:.4f}" if c in ("loss",) else f"{s[c]:.2f}" if isinstance(s[c], float) else str(s[c]))
                for c in cols
            ]
            rows.append([split, model, s["rows"], *vals])
    return table(["split", "model", "rows", *cols], rows)


def side_by_side_markdown(table: pd.DataFrame, n: int = 5, width: int = 80) -> str:
    from pipeline.core.markdown import table as markdown_table

    choice = "base_choice" in table
    header = [
        "split",
        "prompt",
        "reference",
        "base answer",
        "tuned answer",
        "base ROUGE-L",
        "tuned ROUGE-L",
        "name hit base/tuned",
    ] + (["choice base/tuned (rank)"] if choice else [])
    rows = []
    for _, r in table.head(n).iterrows():
        row = [
            r["split"],
            r["prompt"],
            r["reference"],
            r["base_answer"],
            r["tuned_answer"],
            f"{r['base_rouge_l']:.1f}",
            f"{r['tuned_rouge_l']:.1f}",
            f"{r['base_name_hit']}/{r['tuned_name_hit']}" if r["medicine"] else "unknown",
        ]
        if choice:
            row.append(
                f"{r['base_choice']} ({r['base_choice_rank']:.0f}) / {r['tuned_choice']} ({r['tuned_choice_rank']:.0f})"
                if r["base_choice"]
                else "n/a"
            )
        rows.append(row)
    return markdown_table(header, rows, width)


ROWS_TABLE = "evaluation/rows.json"  # where the per-row table lies among a run's artifacts
ROW_COLUMNS = {  # the per-row table's columns: what a reader compares across runs in MLflow's UI
    "split": "split",
    "question": "prompt",
    "reference_medicine": "medicine",
    "base_answer": "base_answer",
    "tuned_answer": "tuned_answer",
    "base_choice": "base_choice",
    "tuned_choice": "tuned_choice",
    "base_right": None,
    "tuned_right": None,
    "base_rouge_l": "base_rouge_l",
    "tuned_rouge_l": "tuned_rouge_l",
    "medicine_seen_in_training": "medicine_seen_in_training",
    "instruction": "prompt",
    "record_id": "record_id",
}


def row_table(table: pd.DataFrame) -> pd.DataFrame:
    """The evaluation's rows for people: the question (the case; its instruction in a column of its
    own, near the end), the reference medicine, both answers, the
    medicine each model finds most likely and whether it is right, ROUGE-L. Columns a run did not
    score (no medicine choice) are left out."""
    out = pd.DataFrame(index=table.index)
    # the prompt is "instruction\ninput": the case (input) first, where rows differ
    parts = table["prompt"].astype(str).str.split("\n", n=1)
    for name, source in ROW_COLUMNS.items():
        if name == "question":
            out[name] = parts.map(lambda p: p[-1])
        elif name == "instruction":
            out[name] = parts.map(lambda p: p[0] if len(p) > 1 else "")
        elif name.endswith("_right"):
            rank = f"{name.removesuffix('_right')}_choice_rank"
            if rank in table:
                out[name] = table[rank].map(lambda r: None if r is None or r != r else bool(r == 1))
        elif source in table:
            out[name] = table[source]
    return out.reset_index(drop=True)
