"""Stage (asset ``sweep_comparison``): a sweep's trials side by side, as a table and plots.

One row per trial (finished, failed or not run yet): its method and settings, held-out loss
before and after, medicine-choice accuracy (held-out and trained cases) where the data names
medicines, trainable parameters, adapter size, training time and peak memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class SweepComparison:
    """What ``sweep_comparison`` hands on: the folder of the table and plots, the best trial, trials by status."""

    name: str
    path: str
    best_trial: str | None
    counts: dict[str, int] = field(default_factory=dict)


COLUMNS = [
    "trial",
    "status",
    "method",
    "r",
    "learning_rate",
    "eval_loss",
    "base_eval_loss",
    "eval_choice_accuracy",
    "train_choice_accuracy",
    "eval_rouge_l",
    "trainable_parameters",
    "adapter_mb",
    "train_seconds",
    "peak_rss_mb",
    "peak_gpu_mb",
    "error",
]


def comparison_table(records: list[dict[str, Any]], defaults: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per trial; ``defaults`` (the training settings' defaults) fill what a trial leaves unset."""
    rows = []
    for rec in records:
        s, f = {**(defaults or {}), **rec.get("settings", {})}, rec.get("figures", {})
        size = f.get("adapter_bytes")
        rows.append(
            {
                "trial": rec["label"],
                "status": rec.get("status", "pending"),
                "method": s.get("method", "lora"),
                "r": s.get("r"),
                "learning_rate": s.get("learning_rate"),
                "eval_loss": f.get("tuned_eval_loss", f.get("final_eval_loss")),
                "base_eval_loss": f.get("base_eval_loss", f.get("first_eval_loss")),
                "eval_choice_accuracy": f.get("tuned_eval_choice_accuracy"),
                "train_choice_accuracy": f.get("tuned_train_sample_choice_accuracy"),
                "eval_rouge_l": f.get("tuned_eval_rouge_l"),
                "trainable_parameters": f.get("trainable_parameters"),
                "adapter_mb": round(size / 2**20, 3) if size else None,
                "train_seconds": f.get("train_seconds"),
                "peak_rss_mb": f.get("peak_rss_mb"),
                "peak_gpu_mb": f.get("peak_gpu_mb"),
                "error": (rec.get("error") or "")[:300],
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def best_trial(table: pd.DataFrame) -> str | None:
    """The finished trial with the lowest held-out loss."""
    done = table[(table["status"] == "finished") & table["eval_loss"].notna()]
    return None if done.empty else str(done.sort_values("eval_loss").iloc[0]["trial"])


def table_markdown(table: pd.DataFrame) -> str:
    from pipeline.core.markdown import table as markdown_table

    def value(v):
        return f"{v:.4g}" if isinstance(v, float) and v == v else v

    cols = [c for c in COLUMNS if c != "error" or table["error"].astype(bool).any()]
    return markdown_table(cols, [[value(r[c]) for c in cols] for _, r in table.iterrows()])


def comparison_plot(table: pd.DataFrame) -> bytes:
    """Four bar charts (held-out loss, choice accuracy, trainable parameters, training time) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table[table["status"] == "finished"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    panels = [
        ("eval_loss", "held-out loss (base: grey)", False),
        ("eval_choice_accuracy", "held-out medicine-choice accuracy", False),
        ("trainable_parameters", "trainable parameters", True),
        ("train_seconds", "training seconds", False),
    ]
    labels = done["trial"].tolist()
    for ax, (col, title, log) in zip(axes.flat, panels):
        values = pd.to_numeric(done[col], errors="coerce").fillna(0).tolist()
        ax.bar(range(len(labels)), values, color="tab:blue")
        if col == "eval_loss":
            base = pd.to_numeric(done["base_eval_loss"], errors="coerce").tolist()
            ax.scatter(range(len(labels)), base, color="grey", marker="_", s=400, zorder=3)
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        if log:
            ax.set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
