"""Stage (asset ``evaluation_report``): the base model against the tuned one, on the same prompts.

"Tuned" is the base weights with the adapter attached; "base" is the same object with the adapter
switched off (``PeftModel.disable_adapter``), so both see exactly the same base weights, the
training chat template and the training system prompt.

Rows: every eval-split row, plus a fixed sample of train rows (what the model absorbed). For each
model and split:

- loss and perplexity on the answer tokens only (the tokenized dataset's labels); on the train
  sample only with ``train_sample_loss`` (its rows otherwise run their prompt alone);
- greedy answers (no sampling, ``max_new_tokens``, stop at the end-of-turn token), generated in
  batches with left padding;
- BLEU-4 on characters (smoothing method 3) and ROUGE-1/2/L F on jieba-segmented words, the
  convention of LLaMA-Factory's Chinese metrics, through nltk and rouge-chinese, on a 0-100 scale;
- medicine-name hit rate: the medicine named in the reference answer appears in the generated
  answer. Rows whose reference names no medicine in a known form are "unknown", not misses;
- medicine-choice accuracy and mean rank by likelihood (``pipeline.stages.evaluation_report.choice``): which of the
  data set's medicines the model finds most probable as its answer's opening. On eval rows also
  over the subset whose medicine occurs in training (``seen_medicine_choice_accuracy``): a
  medicine never trained on cannot be learnt from the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from pydantic import ConfigDict

from pipeline.core.progress import Progress
from pipeline.core.tracking_sync import COMPLETE
from pipeline.stages.evaluation_report.choice import ChoiceSet, combine_forms, openings_ids, rank_of, score_prefilled
from pipeline.stages.evaluation_report.metrics import NAME_PATTERNS, extract_medicine_name, name_hit, text_scores
from pipeline.stages.evaluation_report.report import (
    MODELS,
    SPLITS,
    side_by_side_markdown,
    summary_markdown,
    tuned_beats_base,
)
from pipeline.stages.evaluation_report.settings import EvaluationSettings
from pipeline.stages.lora_adapter.generation import decode_greedy, prefill, prompt_length
from pipeline.stages.lora_adapter.weights import lora_merged
from pipeline.stages.tokenized_dataset import pad_token_id

__all__ = [
    "EvalConfig",
    "EvaluationResult",
    "NAME_PATTERNS",
    "evaluate_models",
    "extract_medicine_name",
    "name_hit",
    "select_rows",
    "side_by_side_markdown",
    "summary_markdown",
    "text_scores",
    "tuned_beats_base",
]

TEXT_METRICS = ("bleu_4", "rouge_1", "rouge_2", "rouge_l")

# ------------------------------------------------------------------------ report


class EvalConfig(EvaluationSettings):
    """The settings, and what the ``evaluation_report`` asset finds in the data for them."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    system_prompt: str
    choices: ChoiceSet | None = None  # candidate medicines and answer forms; None: no choice scoring
    train_medicines: frozenset[str] = frozenset()  # medicines named in training answers


@dataclass(frozen=True)
class EvaluationReport:
    """What ``evaluation_report`` hands on: where the per-row table and summary lie, the summary
    (model -> split -> figure), the gate's verdict and the system prompt both models answered under."""

    path: str
    key: str
    summary: dict[str, Any]
    gate_passed: bool
    gate_reason: str
    system_prompt: str
    mlflow_run_id: str | None = None
    mlflow_tracking: str = COMPLETE


@dataclass
class EvaluationResult:
    table: pd.DataFrame  # one row per prompt, both models side by side
    summary: dict[str, dict[str, dict[str, Any]]]  # model -> split -> metric -> value
    rows_by_split: dict[str, int] = field(default_factory=dict)
    base: dict | None = None  # the base model's part, reusable for another adapter over the same base

    def flat_metrics(self) -> dict[str, float]:
        """``base_eval_loss``, ``tuned_eval_rouge_l``, ... (the MLflow metric names)."""
        out = {}
        for model, splits in self.summary.items():
            for split, metrics in splits.items():
                for name, value in metrics.items():
                    if isinstance(value, (int, float)) and value is not None and not isinstance(value, bool):
                        out[f"{model}_{split}_{name}"] = float(value)
        return out


def select_rows(
    alpaca: pd.DataFrame, tokenized: dict[str, pd.DataFrame], train_sample_size: int, seed: int
) -> pd.DataFrame:
    """Every eval row plus a fixed sample of train rows (the same sample for the same data and seed),
    joined with their tokenized ids and labels."""
    frames = []
    ev = tokenized["eval"][["record_id", "input_ids", "labels"]].assign(split="eval")
    frames.append(ev)
    tr = tokenized["train"][["record_id", "input_ids", "labels"]]
    if train_sample_size > 0 and len(tr):
        tr = tr.sort_values("record_id").sample(n=min(train_sample_size, len(tr)), random_state=seed)
        frames.append(tr.assign(split="train_sample"))
    rows = pd.concat(frames, ignore_index=True)
    text = alpaca.set_index("record_id")[["instruction", "input", "output"]]
    return rows.join(text, on="record_id")


def _summarise(table: pd.DataFrame, model: str, split: str, losses: list[tuple[float, int]]) -> dict[str, Any]:
    total = sum(l for l, _ in losses)
    tokens = sum(n for _, n in losses)
    loss = total / tokens if tokens else None  # None: no answer loss computed on these rows
    hits = table[f"{model}_name_hit"].dropna()
    out: dict[str, Any] = {
        "rows": int(len(table)),
        "loss": round(loss, 6) if loss is not None else None,
        "perplexity": (round(math.exp(loss), 4) if loss < 50 else float("inf")) if loss is not None else None,
    }
    for name in TEXT_METRICS:
        out[name] = round(float(table[f"{model}_{name}"].mean()), 4) if len(table) else 0.0
    out["name_hit_rate"] = round(float(hits.astype(bool).mean()), 4) if len(hits) else None
    out["name_known_rows"] = int(len(hits))
    out["answer_tokens_mean"] = round(float(table[f"{model}_answer_tokens"].mean()), 2) if len(table) else 0.0
    if f"{model}_choice_rank" in table:
        ranks = table[f"{model}_choice_rank"].dropna()
        out["choice_accuracy"] = round(float((ranks == 1).mean()), 4) if len(ranks) else None
        out["choice_rank"] = round(float(ranks.mean()), 3) if len(ranks) else None
        out["choice_rows"] = int(len(ranks))
        if split == "eval":
            seen = table.loc[table["medicine_seen_in_training"].astype(bool), f"{model}_choice_rank"].dropna()
            out["seen_medicine_choice_accuracy"] = round(float((seen == 1).mean()), 4) if len(seen) else None
            out["seen_medicine_choice_rows"] = int(len(seen))
    return out


def evaluate_models(
    model, tokenizer, rows: pd.DataFrame, config: EvalConfig, stop_ids: list[int], log=print, base: dict | None = None
) -> EvaluationResult:
    """Run both models (``model`` is a PeftModel; its adapter is switched off for "base"). ``base``:
    the base model's part of an earlier evaluation of the same rows and settings (:func:`base_part`),
    used instead of running the base model again."""
    table = rows_table(rows, config)
    pairs = [([int(t) for t in i], [int(t) for t in l]) for i, l in zip(rows["input_ids"], rows["labels"])]
    choices = config.choices if config.choices else None
    gold = [choices.candidates.index(m) if choices and m in choices.candidates else None for m in table["medicine"]]
    scored = [i for i, g in enumerate(gold) if g is not None]
    openings = openings_ids(tokenizer, choices) if choices and scored else None
    settings = {
        "with_loss": {i for i, split in enumerate(rows["split"]) if split == "eval" or config.train_sample_loss},
        "max_new_tokens": config.max_new_tokens,
        "stop_ids": stop_ids,
        "pad_id": pad_token_id(tokenizer, stop_ids[0]),
        "batch_size": config.batch_size,
        "log": log,
    }
    losses: dict[str, list[tuple[float, int]]] = {}
    model.eval()
    for name in MODELS:
        if name == "base" and base is not None and base.get("record_id") == table["record_id"].tolist():
            for column, values in base["columns"].items():
                table[column] = values
            losses[name] = [tuple(x) for x in base["losses"]]
            log("base model: its answers, losses and choices for these rows and settings reused (same base weights)")
            continue
        # the base: the adapter switched off; the tuned model: plain LoRA layers as merged weights
        with model.disable_adapter() if name == "base" else lora_merged(model):
            run = run_model(model, pairs, openings, set(scored), name=name, **settings)
        losses[name] = run["losses"]
        add_model_columns(table, name, tokenizer, run, choices if openings else None, gold, scored)
    result = EvaluationResult(table, summarise(table, losses), {s: int((table["split"] == s).sum()) for s in SPLITS})
    result.base = {
        "record_id": table["record_id"].tolist(),
        "losses": [list(x) for x in losses["base"]],
        "columns": {c: table[c].tolist() for c in table.columns if c.startswith("base_")},
    }
    return result


def rows_table(rows: pd.DataFrame, config: EvalConfig) -> pd.DataFrame:
    """One row per evaluated prompt: its split, prompt, reference answer and the medicine it names."""
    table = pd.DataFrame(
        {
            "record_id": rows["record_id"],
            "split": rows["split"],
            "prompt": [f"{i}\n{x}" if x else i for i, x in zip(rows["instruction"], rows["input"])],
            "reference": rows["output"],
            "medicine": rows["output"].map(extract_medicine_name),
        }
    )
    table["medicine_seen_in_training"] = table["medicine"].map(lambda m: bool(m) and m in config.train_medicines)
    return table


def add_model_columns(
    table: pd.DataFrame, name: str, tokenizer, run: dict, choices, gold: list, scored: list[int]
) -> None:
    """One model's answers, answer lengths, losses, text scores and (with ``choices``) medicine choice."""
    ids = run["answers"]
    table[f"{name}_answer"] = [a.strip() for a in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    table[f"{name}_answer_tokens"] = [len(x) for x in ids]
    table[f"{name}_loss"] = [round(l / n, 6) if n else float("nan") for l, n in run["losses"]]
    scores = [text_scores(a, r) for a, r in zip(table[f"{name}_answer"], table["reference"])]
    for metric in (*TEXT_METRICS, "name_hit"):
        table[f"{name}_{metric}"] = [s[metric] for s in scores]
    if choices:
        ranks: list[float | None] = [None] * len(table)
        best: list[str | None] = [None] * len(table)
        for i in scored:
            sc = combine_forms(run["choices"][i])
            ranks[i] = rank_of(sc, gold[i])
            best[i] = choices.candidates[max(range(len(sc)), key=sc.__getitem__)]
        table[f"{name}_choice_rank"] = ranks
        table[f"{name}_choice"] = best


def summarise(table: pd.DataFrame, losses: dict[str, list[tuple[float, int]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> split -> metric, with the paired choice counts the registry gate's sign test reads."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name in MODELS:
        summary[name] = {}
        for split in SPLITS:
            mask = (table["split"] == split).to_numpy()
            if mask.any():
                summary[name][split] = _summarise(
                    table[mask], name, split, [l for l, m in zip(losses[name], mask) if m]
                )
    if "base_choice_rank" in table and "tuned_choice_rank" in table:
        # paired: the rows one model picks right and the other wrong
        for split, metrics in summary["tuned"].items():
            pair = table[
                (table["split"] == split) & table["base_choice_rank"].notna() & table["tuned_choice_rank"].notna()
            ]
            base_right, tuned_right = pair["base_choice_rank"] == 1, pair["tuned_choice_rank"] == 1
            metrics["choice_only_tuned_right"] = int((tuned_right & ~base_right).sum())
            metrics["choice_only_base_right"] = int((base_right & ~tuned_right).sum())
    return summary


def run_model(
    model,
    rows: list[tuple[list[int], list[int]]],
    openings: list[list[list[int]]] | None,
    scored: set[int],
    *,
    with_loss: set[int] | None = None,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    batch_size: int,
    log=print,
    name: str = "model",
) -> dict[str, Any]:
    """One model over the evaluated rows (tokenized prompt + answer), ``batch_size`` rows at a time:
    each row's forward gives its answer loss, its prompt's cache and first greedy token; the rows in
    ``scored`` have every medicine opening scored over that cache (``choice.score_prefilled``);
    then the batch decodes together. Rows not in ``with_loss`` (None: every row) run their prompt
    only: no answer loss. Logs each batch: rows done, phase times, new tokens/s, ETA."""
    import time

    order = sorted(range(len(rows)), key=lambda i: -prompt_length(rows[i][1]))  # similar prompt lengths together
    losses: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    answers: list[list[int]] = [[] for _ in rows]
    choices: dict[int, list[list[float]]] = {}
    times = {"prefill": 0.0, "choice": 0.0, "decode": 0.0}
    tokens = {"prefill": 0, "choice": 0, "decode": 0}
    progress = Progress(log, f"{name} model", len(rows), every=5.0)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ready = []
        for i in idx:
            t0 = time.perf_counter()
            ids, labels = rows[i]
            if with_loss is not None and i not in with_loss:
                ids, labels = ids[: prompt_length(labels)], None  # the prompt only
            row = prefill(model, list(ids), list(labels) if labels is not None else None)
            times["prefill"] += time.perf_counter() - t0
            tokens["prefill"] += len(ids)
            losses[i] = (row.loss, row.tokens)
            if openings and i in scored:
                t0 = time.perf_counter()
                choices[i] = score_prefilled(model, row, openings)
                times["choice"] += time.perf_counter() - t0
            ready.append(row)
            progress(start + len(ready), f"prefill {times['prefill']:.1f} s, choice {times['choice']:.1f} s")
        t0 = time.perf_counter()
        new = decode_greedy(model, ready, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)
        times["decode"] += time.perf_counter() - t0
        for i, a in zip(idx, new):
            answers[i] = a
        tokens["decode"] += sum(len(a) for a in new)
        log(
            f"{name} model: {start + len(idx)}/{len(rows)} rows; {tokens['decode']} new tokens in "
            f"{times['decode']:.1f} s "
            f"({tokens['decode'] / max(times['decode'], 1e-9):.1f} tokens/s); prompts and answer losses over "
            f"{tokens['prefill']} tokens in "
            f"{times['prefill']:.1f} s; choice scoring {times['choice']:.1f} s"
        )
    return {"losses": losses, "answers": answers, "choices": choices, "times": times, "tokens": tokens}
