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

One prompt and form cost one forward of the prompt and of the tokens every candidate opening
shares (their KV cache kept), and one batched forward of the rest of the openings over that cache.
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
        from pipeline.evaluate import extract_medicine_name

        names = [extract_medicine_name(a) for a in answers]
        forms = Counter(f for a, n in zip(answers, names) if n for f in [answer_form(a, n)] if f)
        total = sum(forms.values())
        kept = [f for f, c in forms.most_common(max_forms) if total and c / total >= min_share]
        return cls(sorted({n for n in names if n}), kept)

    def __bool__(self) -> bool:
        return len(self.candidates) >= 2 and bool(self.forms)


def score_prompt(model, prompt_ids: list[int], continuations: list[list[int]], batch_size: int = 32) -> list[float]:
    """log P(continuation | prompt) for each continuation. The prompt and the continuations' common
    first tokens run once; the cache is repeated for the rest of each continuation."""
    import os

    import torch

    device = model.device
    common = list(os.path.commonprefix(continuations))
    if any(len(c) == len(common) for c in continuations):
        common = common[:-1]  # every continuation keeps at least one token of its own
    context = prompt_ids + common
    with torch.no_grad():
        out = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=len(common) + 1)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)  # predictions for common[0:] and the next token
        shared = sum(logp[i, t].item() for i, t in enumerate(common))
        first = logp[-1]
        scores: list[float] = []
        for start in range(0, len(continuations), batch_size):
            rests = [c[len(common) :] for c in continuations[start : start + batch_size]]
            width = max(len(r) for r in rests)
            ids = torch.zeros((len(rests), width), dtype=torch.long, device=device)
            mask = torch.zeros((len(rests), len(context) + width), dtype=torch.long, device=device)
            mask[:, : len(context)] = 1
            for k, r in enumerate(rests):
                ids[k, : len(r)] = torch.tensor(r, device=device)
                mask[k, len(context) : len(context) + len(r)] = 1
            totals = [shared + first[r[0]].item() for r in rests]
            if width > 1:
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(len(rests))
                logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True).logits
                steps = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                for k, r in enumerate(rests):
                    totals[k] += steps[k, : len(r) - 1].sum().item()
            scores.extend(totals)
    return scores


def choice_scores(model, tokenizer, prompts: list[str], choices: ChoiceSet) -> list[list[float]]:
    """[prompt][candidate]: log-sum-exp over the forms of log P(opening naming the candidate | prompt)."""
    openings = [[tokenizer(f.format(name=m), add_special_tokens=False)["input_ids"] for m in choices.candidates]
                for f in choices.forms]
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        per_form = [score_prompt(model, ids, conts) for conts in openings]
        out.append([_logsumexp([scores[i] for scores in per_form]) for i in range(len(choices.candidates))])
    return out


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rank_of(scores: list[float], gold: int) -> int:
    """The right candidate's place when sorted by score, best first (ties: the earlier candidate first,
    so that a model with no preference is not scored right)."""
    return 1 + sum(1 for i, s in enumerate(scores) if s > scores[gold] or (s == scores[gold] and i < gold))
