"""Stage (asset ``sweep_trial``): one trial's record, what the comparison reads.

A trial trains (``lora_adapter``'s code, cached by adapter id) and evaluates (``evaluation_report``'s
code); its record, ``sweeps/<sweep>/trials/<label>.json``, holds the settings, the status
(``finished`` or ``failed`` with the error) and the figures the comparison shows. A failed trial
writes its record too: the comparison lists it, and the other trials go on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FINISHED, FAILED = "finished", "failed"

# figures taken from the training's result
TRAINING_FIGURES = (
    "first_eval_loss",
    "final_eval_loss",
    "final_train_loss",
    "steps",
    "train_seconds",
    "steady_tokens_per_s",
    "mfu",
    "trainable_parameters",
    "total_parameters",
    "adapter_bytes",
    "peak_rss_mb",
    "peak_gpu_mb",
    "optimizer",
)
# figures taken from the evaluation's summary: (model, split, metric)
EVAL_FIGURES = (
    ("tuned", "eval", "loss"),
    ("base", "eval", "loss"),
    ("tuned", "eval", "choice_accuracy"),
    ("base", "eval", "choice_accuracy"),
    ("tuned", "train_sample", "choice_accuracy"),
    ("tuned", "eval", "rouge_l"),
    ("base", "eval", "rouge_l"),
)


def record_path(sweep_dir: Path, label: str) -> Path:
    return Path(sweep_dir) / "trials" / f"{label}.json"


def trial_figures(training: dict[str, Any], summary: dict[str, Any] | None) -> dict[str, Any]:
    out = {k: training.get(k) for k in TRAINING_FIGURES}
    for model, split, metric in EVAL_FIGURES:
        value = (summary or {}).get(model, {}).get(split, {}).get(metric)
        out[f"{model}_{split}_{metric}"] = value
    return out


def write_record(sweep_dir: Path, label: str, record: dict[str, Any]) -> Path:
    from pipeline.core.atomic import write_bytes_atomic

    path = record_path(sweep_dir, label)
    write_bytes_atomic(path, json.dumps({"label": label, **record}, ensure_ascii=False, indent=1, default=str).encode())
    return path


def read_records(sweep_dir: Path, labels: list[str]) -> list[dict[str, Any]]:
    """The records of ``labels`` in plan order; a trial not run yet is ``pending``."""
    out = []
    for label in labels:
        path = record_path(sweep_dir, label)
        out.append(json.loads(path.read_text()) if path.is_file() else {"label": label, "status": "pending"})
    return out
