"""What the answers say: the medicine an answer names, and BLEU / ROUGE on Chinese text."""

from __future__ import annotations

import logging
import re
from typing import Any

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
    return {
        "bleu_4": bleu4_chars(prediction, reference),
        **rouge_words(prediction, reference),
        "name_hit": name_hit(reference, prediction),
    }
