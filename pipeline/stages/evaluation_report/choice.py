"""Medicine-choice accuracy by likelihood (part of the ``evaluation_report`` stage).

Greedy answers show learning late: a model that has half-learned which medicine fits a case
still opens with a wrong name. Scored the way lm-evaluation-harness scores multiple choice, the
same model shows it: for every prompt, every medicine named anywhere in the data set's answers is a
candidate, and the candidate's score is the log-probability of an answer opening that names it,
under the chat template, summed (log-sum-exp) over the answer forms the data uses. Reported: top-1
accuracy and the mean rank of the right medicine (1 = first).

The forms are read from the data, not written here: each answer's opening up to the medicine's
name and the character after it, with the name taken out ("{name}可", "您的病症适用{name}。" in the
real data); forms that open at least ``min_share`` of the answers are kept.

One prompt costs one forward of the prompt; each form, one forward of the tokens all its openings
share over the prompt's KV cache, and one batched forward of the rest of the openings.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

SENTENCE_END = "。！？!?\n"


def answer_form(answer: str, name: str, max_offset: int = 40) -> str | None:
    """The answer's opening up to its medicine's name and the one character after it (which ends the
    name, so that a name that is the start of a longer one is not taken for it), with the name
    replaced by ``{name}``; None when the name is not near the start."""
    at = answer.find(name)
    if at < 0 or at > max_offset:
        return None
    opening = answer[: at + len(name) + 1]
    return opening.replace("{", "{{").replace("}", "}}").replace(name, "{name}")


@dataclass
class ChoiceSet:
    candidates: list[str]  # every medicine named in the answers, sorted
    forms: list[str]  # answer openings with "{name}", most common first

    @classmethod
    def from_answers(cls, answers: list[str], min_share: float = 0.1, max_forms: int = 4) -> "ChoiceSet":
        from pipeline.stages.evaluation_report import extract_medicine_name

        names = [extract_medicine_name(a) for a in answers]
        forms = Counter(f for a, n in zip(answers, names) if n for f in [answer_form(a, n)] if f)
        total = sum(forms.values())
        kept = [f for f, c in forms.most_common(max_forms) if total and c / total >= min_share]
        return cls(sorted({n for n in names if n}), kept)

    def __bool__(self) -> bool:
        return len(self.candidates) >= 2 and bool(self.forms)


def score_prompt(model, prompt_ids: list[int], forms: list[list[list[int]]], batch_size: int = 64) -> list[list[float]]:
    """log P(continuation | prompt) for every continuation of every form ([form][continuation]).

    The prompt runs once; for each form, the tokens all its continuations share run once over the
    prompt's cache, and the rest of each continuation in a batch over a copy of that cache."""
    import torch

    device = model.device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        after_prompt = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        return [_score_form(model, out.past_key_values, after_prompt, len(prompt_ids), conts, batch_size) for conts in forms]


def _score_form(model, prompt_cache, after_prompt, prompt_len: int, continuations: list[list[int]], batch_size: int) -> list[float]:
    import os

    import torch

    device = model.device
    common = list(os.path.commonprefix(continuations))
    if any(len(c) == len(common) for c in continuations):
        common = common[:-1]  # every continuation keeps at least one token of its own
    cache = copy.deepcopy(prompt_cache)
    shared, first = 0.0, after_prompt
    if common:
        out = model(input_ids=torch.tensor([common], device=device), past_key_values=cache, use_cache=True)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)  # predictions for common[1:] and the next token
        shared = after_prompt[common[0]].item() + sum(logp[i, t].item() for i, t in enumerate(common[1:]))
        first, cache = logp[-1], out.past_key_values
    context = prompt_len + len(common)
    scores: list[float] = []
    for start in range(0, len(continuations), batch_size):
        rests = [c[len(common) :] for c in continuations[start : start + batch_size]]
        totals = [shared + first[r[0]].item() for r in rests]
        width = max(len(r) for r in rests)
        if width > 1:
            ids = torch.zeros((len(rests), width - 1), dtype=torch.long, device=device)
            mask = torch.zeros((len(rests), context + width - 1), dtype=torch.long, device=device)
            mask[:, :context] = 1
            for k, r in enumerate(rests):
                ids[k, : len(r) - 1] = torch.tensor(r[:-1], device=device)
                mask[k, context : context + len(r) - 1] = 1
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rests))
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=batch_cache, use_cache=True).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for k, r in enumerate(rests):
                if len(r) > 1:
                    totals[k] += logp[k, torch.arange(len(r) - 1, device=device), torch.tensor(r[1:], device=device)].sum().item()
        scores.extend(totals)
    return scores


def choice_scores(model, tokenizer, prompts: list[str], choices: ChoiceSet) -> list[list[float]]:
    """[prompt][candidate]: log-sum-exp over the forms of log P(opening naming the candidate | prompt)."""
    openings = [[tokenizer(f.format(name=m), add_special_tokens=False)["input_ids"] for m in choices.candidates]
                for f in choices.forms]
    out = []
    for prompt in prompts:
        per_form = score_prompt(model, tokenizer(prompt, add_special_tokens=False)["input_ids"], openings)
        out.append([_logsumexp([scores[i] for scores in per_form]) for i in range(len(choices.candidates))])
    return out


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rank_of(scores: list[float], gold: int) -> int:
    """The right candidate's place when sorted by score, best first (ties: the earlier candidate first,
    so that a model with no preference is not scored right)."""
    return 1 + sum(1 for i, s in enumerate(scores) if s > scores[gold] or (s == scores[gold] and i < gold))
