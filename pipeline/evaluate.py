"""Stage (asset ``evaluation_report``): the base model against the tuned one, on the same prompts.

"Tuned" is the base weights with the adapter attached; "base" is the same object with the adapter
switched off (``PeftModel.disable_adapter``), so both see exactly the same base weights, the
training chat template and the training system prompt.

Rows: every eval-split row, plus a fixed sample of train rows (what the model absorbed). For each
model and split:

- loss and perplexity on the answer tokens only (the tokenized dataset's labels);
- greedy answers (no sampling, ``max_new_tokens``, stop at the end-of-turn token), generated in
  batches with left padding;
- BLEU-4 on characters (smoothing method 3) and ROUGE-1/2/L F on jieba-segmented words, the
  convention of LLaMA-Factory's Chinese metrics, through nltk and rouge-chinese, on a 0-100 scale;
- medicine-name hit rate: the medicine named in the reference answer appears in the generated
  answer. Rows whose reference names no medicine in a known form are "unknown", not misses;
- medicine-choice accuracy and mean rank by likelihood (``pipeline.evaluate_choice``): which of the
  data set's medicines the model finds most probable as its answer's opening. On eval rows also
  over the subset whose medicine occurs in training (``seen_medicine_choice_accuracy``): a
  medicine never trained on cannot be learnt from the data.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.evaluate_choice import ChoiceSet, choice_scores, rank_of
from pipeline.tokenization import IGNORE_INDEX, pad_token_id, render_prompt

MODELS = ("base", "tuned")
SPLITS = ("eval", "train_sample")
TEXT_METRICS = ("bleu_4", "rouge_1", "rouge_2", "rouge_l")

# ---------------------------------------------------------------- medicine names

_NAME = r"([^\s，。,.；;：:、！!？?“”\"'（）()【】《》]{2,24}?)"
# the forms the real answers use, and close variants seen in Chinese patent-medicine Q&A
NAME_PATTERNS = [
    re.compile(r"^\s*" + _NAME + r"可能适合治疗您的(?:病症|症状|疾病)"),
    re.compile(r"您的(?:病症|症状|疾病)(?:适用|可用|可以使用|可以用)" + _NAME + r"(?:[。，,.；;！!\s]|$)"),
    re.compile(r"以下是" + _NAME + r"的(?:详细)?说明书"),
    re.compile(r"(?:推荐|建议)(?:您)?(?:使用|服用|选用)" + _NAME + r"(?:[。，,.；;！!\s]|$)"),
    re.compile(r"^\s*" + _NAME + r"(?:适合|适用于|可用于)(?:治疗)?您"),
]


def extract_medicine_name(reference: str) -> str | None:
    """The medicine a reference answer names, read from its own wording; ``None`` when unknown."""
    for pattern in NAME_PATTERNS:
        m = pattern.search(reference or "")
        if m:
            return m.group(1)
    return None


def name_hit(reference: str, generated: str) -> bool | None:
    name = extract_medicine_name(reference)
    if name is None:
        return None
    return name in (generated or "")


# ------------------------------------------------------------------- text metrics


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def bleu4_chars(prediction: str, reference: str) -> float:
    """BLEU-4 on characters, smoothing method 3 (LLaMA-Factory), 0-100."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not prediction or not reference:
        return 0.0
    score = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return round(float(score) * 100, 4)


def rouge_words(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F on jieba-segmented words (rouge-chinese), 0-100."""
    from rouge_chinese import Rouge

    jieba = _jieba()
    hyp = " ".join(jieba.cut(prediction or ""))
    ref = " ".join(jieba.cut(reference or ""))
    if not hyp.split() or not ref.split():
        return {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    scores = Rouge().get_scores(hyp, ref)[0]
    return {
        "rouge_1": round(scores["rouge-1"]["f"] * 100, 4),
        "rouge_2": round(scores["rouge-2"]["f"] * 100, 4),
        "rouge_l": round(scores["rouge-l"]["f"] * 100, 4),
    }


def text_scores(prediction: str, reference: str) -> dict[str, Any]:
    return {"bleu_4": bleu4_chars(prediction, reference), **rouge_words(prediction, reference),
            "name_hit": name_hit(reference, prediction)}


# ---------------------------------------------------------------- model figures


def answer_losses(model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 4) -> list[tuple[float, int]]:
    """(summed loss, supervised tokens) per row, on the answer tokens only.

    Batched; each row's figure equals the model's own loss on that row alone (a test checks it).
    """
    import torch
    import torch.nn.functional as F

    from pipeline.training.batching import collate_padded as collate

    out: list[tuple[float, int]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            token_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(labels.shape)
            mask = labels != IGNORE_INDEX
            for k in range(labels.size(0)):
                out.append((float(token_loss[k][mask[k]].sum()), int(mask[k].sum())))
    return out


def generate_greedy(model, tokenizer, prompts: list[str], *, max_new_tokens: int, stop_ids: list[int], batch_size: int = 8) -> list[list[int]]:
    """Greedy continuations (new token ids, up to and excluding the first stop token), in batches
    with left padding; prompts of similar length are batched together."""
    import torch

    pad_id = pad_token_id(tokenizer, stop_ids[0])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
            )
            for row, i in enumerate(idx):
                new = generated[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
                results[i] = new[:cut]
    return results


# ------------------------------------------------------------------------ report


@dataclass
class EvalConfig:
    system_prompt: str
    # the defaults of the evaluation_report asset's config (declared here once, read there)
    max_new_tokens: int = 64  # greedy answer length limit (stops earlier at the end-of-turn token)
    train_sample_size: int = 16  # train rows added to the eval rows, a fixed sample
    batch_size: int = 64  # prompts per generation batch (left padding)
    seed: int = 42
    choices: "ChoiceSet | None" = None  # candidate medicines and answer forms; None: no choice scoring
    train_medicines: frozenset[str] = frozenset()  # medicines named in training answers


@dataclass
class EvaluationResult:
    table: pd.DataFrame  # one row per prompt, both models side by side
    summary: dict[str, dict[str, dict[str, Any]]]  # model -> split -> metric -> value
    rows_by_split: dict[str, int] = field(default_factory=dict)

    def flat_metrics(self) -> dict[str, float]:
        """``base_eval_loss``, ``tuned_eval_rouge_l``, ... (the MLflow metric names)."""
        out = {}
        for model, splits in self.summary.items():
            for split, metrics in splits.items():
                for name, value in metrics.items():
                    if isinstance(value, (int, float)) and value is not None and not isinstance(value, bool):
                        out[f"{model}_{split}_{name}"] = float(value)
        return out


def select_rows(alpaca: pd.DataFrame, tokenized: dict[str, pd.DataFrame], train_sample_size: int, seed: int) -> pd.DataFrame:
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
    loss = total / tokens if tokens else float("nan")
    hits = table[f"{model}_name_hit"].dropna()
    out: dict[str, Any] = {
        "rows": int(len(table)),
        "loss": round(loss, 6),
        "perplexity": round(math.exp(loss), 4) if tokens and loss < 50 else float("inf"),
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


def evaluate_models(model, tokenizer, rows: pd.DataFrame, config: EvalConfig, stop_ids: list[int], log=print) -> EvaluationResult:
    """Run both models (``model`` is a PeftModel; its adapter is switched off for "base")."""
    import time

    pad_id = pad_token_id(tokenizer, stop_ids[0])
    prompts = [render_prompt(tokenizer, i, x, config.system_prompt) for i, x in zip(rows["instruction"], rows["input"])]
    pairs = list(zip(rows["input_ids"].map(list), rows["labels"].map(list)))
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
    choices = config.choices if config.choices else None
    gold = [choices.candidates.index(m) if choices and m in choices.candidates else None for m in table["medicine"]]
    scored = [i for i, g in enumerate(gold) if g is not None]
    losses: dict[str, list[tuple[float, int]]] = {}
    model.eval()
    for name in MODELS:
        t0 = time.perf_counter()
        if name == "base":
            with model.disable_adapter():
                losses[name] = answer_losses(model, pairs, pad_id)
                ids = generate_greedy(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, stop_ids=stop_ids, batch_size=config.batch_size)
        else:
            losses[name] = answer_losses(model, pairs, pad_id)
            ids = generate_greedy(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, stop_ids=stop_ids, batch_size=config.batch_size)
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
        table[f"{name}_answer"] = [a.strip() for a in answers]
        table[f"{name}_answer_tokens"] = [len(x) for x in ids]
        table[f"{name}_loss"] = [round(l / n, 6) if n else float("nan") for l, n in losses[name]]
        scores = [text_scores(a, r) for a, r in zip(table[f"{name}_answer"], table["reference"])]
        for metric in (*TEXT_METRICS, "name_hit"):
            table[f"{name}_{metric}"] = [s[metric] for s in scores]
        new_tokens = sum(len(x) for x in ids)
        log(f"{name} model: {len(prompts)} prompts, {new_tokens} new tokens in {time.perf_counter() - t0:.1f} s")
        if choices and scored:
            t0 = time.perf_counter()
            with (model.disable_adapter() if name == "base" else contextlib.nullcontext()):
                scores = choice_scores(model, tokenizer, [prompts[i] for i in scored], choices)
            ranks: list[float | None] = [None] * len(prompts)
            best: list[str | None] = [None] * len(prompts)
            for i, sc in zip(scored, scores):
                ranks[i] = rank_of(sc, gold[i])
                best[i] = choices.candidates[max(range(len(sc)), key=sc.__getitem__)]
            table[f"{name}_choice_rank"] = ranks
            table[f"{name}_choice"] = best
            log(f"{name} model: scored {len(choices.candidates)} medicines x {len(choices.forms)} answer forms "
                f"on {len(scored)} prompts in {time.perf_counter() - t0:.1f} s")
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for name in MODELS:
        summary[name] = {}
        for split in SPLITS:
            mask = (table["split"] == split).to_numpy()
            if not mask.any():
                continue
            split_losses = [l for l, m in zip(losses[name], mask) if m]
            summary[name][split] = _summarise(table[mask], name, split, split_losses)
    return EvaluationResult(table, summary, {s: int((table["split"] == s).sum()) for s in SPLITS})


def tuned_beats_base(summary: dict[str, dict[str, dict[str, Any]]]) -> tuple[bool, str]:
    """The registry gate, on held-out rows: the tuned model's answer loss below the base model's,
    its medicine-choice accuracy not lower (where the data names medicines) and its ROUGE-L not
    lower."""
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
            reasons.append(f"eval medicine-choice accuracy went down (tuned {t['choice_accuracy']:.2f} vs base {b['choice_accuracy']:.2f})")
    said.append(f"ROUGE-L {b['rouge_l']:.2f} → {t['rouge_l']:.2f}")
    if t["rouge_l"] < b["rouge_l"]:
        reasons.append(f"eval ROUGE-L went down (tuned {t['rouge_l']:.2f} vs base {b['rouge_l']:.2f})")
    if reasons:
        return False, "; ".join(reasons)
    return True, ", ".join(said)


def summary_markdown(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    cols = ["loss", "perplexity", "choice_accuracy", "choice_rank", "seen_medicine_choice_accuracy", "bleu_4", "rouge_1",
            "rouge_2", "rouge_l", "name_hit_rate"]
    lines = ["| split | model | rows | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 3)]
    for split in SPLITS:
        for model in MODELS:
            s = summary.get(model, {}).get(split)
            if not s:
                continue
            vals = ["n/a" if s.get(c) is None else (f"{s[c]:.4f}" if c in ("loss",) else f"{s[c]:.2f}" if isinstance(s[c], float) else str(s[c])) for c in cols]
            lines.append(f"| {split} | {model} | {s['rows']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def side_by_side_markdown(table: pd.DataFrame, n: int = 5, width: int = 80) -> str:
    def cell(x: Any) -> str:
        s = str(x).replace("\n", " ").replace("|", "\\|")
        return s if len(s) <= width else s[: width - 1] + "…"

    choice = "base_choice" in table
    lines = ["| split | prompt | reference | base answer | tuned answer | base ROUGE-L | tuned ROUGE-L | name hit base/tuned |"
             + (" choice base/tuned (rank) |" if choice else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if choice else "")]
    for _, r in table.head(n).iterrows():
        hit = f"{r['base_name_hit']}/{r['tuned_name_hit']}" if r["medicine"] else "unknown"
        picks = ""
        if choice:
            picks = (f" {cell(r['base_choice'])} ({r['base_choice_rank']:.0f}) / {cell(r['tuned_choice'])} ({r['tuned_choice_rank']:.0f}) |"
                     if r["base_choice"] else " n/a |")
        lines.append(
            f"| {r['split']} | {cell(r['prompt'])} | {cell(r['reference'])} | {cell(r['base_answer'])} | "
            f"{cell(r['tuned_answer'])} | {r['base_rouge_l']:.1f} | {r['tuned_rouge_l']:.1f} | {hit} |" + picks
        )
    return "\n".join(lines)


def stop_token_ids(tokenizer) -> list[int]:
    """The end-of-turn token first, then the tokenizer's eos if it differs."""
    from pipeline.tokenization import end_of_turn_id

    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def load_tuned_model(base_path: str, adapter_path: str, trust_remote_code: bool = False, dtype: str = "fp32"):
    """The base weights (safetensors only; ``dtype`` fp32, bf16 or fp16) with the adapter attached (its
    weights in the same dtype), and the adapter's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model_source import check_adapter_folder

    check_adapter_folder(adapter_path)
    tokenizer = AutoTokenizer.from_pretrained(adapter_path, trust_remote_code=trust_remote_code)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    base = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model = PeftModel.from_pretrained(base, adapter_path, autocast_adapter_dtype=False)
    model.to(dtype=torch_dtype)
    model.to(inference_device())
    model.eval()
    return model, tokenizer


def eval_dtype(setting: str) -> str:
    """``auto``: bf16 where the device computes it natively (the training's own choice), else fp32."""
    if setting != "auto":
        return setting
    import torch

    from pipeline.training.model import resolve_precision

    return "bf16" if resolve_precision("auto", torch.cuda.is_available()) == "bf16" else "fp32"


def inference_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
