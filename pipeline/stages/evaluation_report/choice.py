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

One prompt costs one forward of the prompt (in the evaluation, the forward that also gives the
answer loss and the first generated token) and one forward of a token tree over its KV cache: every
opening of every form laid into a trie, so that tokens several openings share (a form's words, a
name's common start) run once, each tree token attending to the prompt and to its own ancestors
only (a 4D mask; position ids continue the prompt's). No copy of the prompt's cache is made: the
tree's entries are cropped off again afterwards.
"""

from __future__ import annotations

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
    def from_answers(cls, answers: list[str], min_share: float = 0.1, max_forms: int = 4) -> ChoiceSet:
        from pipeline.stages.evaluation_report import extract_medicine_name

        names = [extract_medicine_name(a) for a in answers]
        forms = Counter(f for a, n in zip(answers, names) if n for f in [answer_form(a, n)] if f)
        total = sum(forms.values())
        kept = [f for f, c in forms.most_common(max_forms) if total and c / total >= min_share]
        return cls(sorted({n for n in names if n}), kept)

    def __bool__(self) -> bool:
        return len(self.candidates) >= 2 and bool(self.forms)


def score_prompt(
    model, prompt_ids: list[int], forms: list[list[list[int]]], batch_size: int = 1024
) -> list[list[float]]:
    """log P(continuation | prompt) for every continuation of every form ([form][continuation])."""
    from pipeline.stages.lora_adapter.generation import prefill

    return score_prefilled(model, prefill(model, prompt_ids), forms, max_nodes=batch_size)


def score_prefilled(model, row, forms: list[list[list[int]]], max_nodes: int = 512) -> list[list[float]]:
    """``score_prompt`` over a prompt already run (:class:`generation.Prefilled`): its cache is used
    as it is and left as it was."""
    flat = [c for conts in forms for c in conts]
    order = sorted(range(len(flat)), key=lambda i: flat[i])  # shared starts side by side
    by_index: dict[int, float] = {}
    group: list[int] = []
    prefixes: set[tuple[int, ...]] = set()
    for i in order:  # trees of at most max_nodes tokens (the mask is nodes x (prompt + nodes))
        new = {tuple(flat[i][:k]) for k in range(1, len(flat[i]))} - prefixes
        if group and len(prefixes) + len(new) > max_nodes:
            by_index.update(zip(group, _score_tree(model, row, [flat[j] for j in group])))
            group, prefixes = [], set()
            new = {tuple(flat[i][:k]) for k in range(1, len(flat[i]))}
        group.append(i)
        prefixes |= new
    if group:
        by_index.update(zip(group, _score_tree(model, row, [flat[j] for j in group])))
    scores = [by_index[i] for i in range(len(flat))]
    out, k = [], 0
    for conts in forms:
        out.append(scores[k : k + len(conts)])
        k += len(conts)
    return out


def _score_tree(model, row, continuations: list[list[int]]) -> list[float]:
    import torch

    from pipeline.stages.lora_adapter.generation import crop_to

    if any(not c for c in continuations):
        raise ValueError("an empty continuation cannot be scored")
    # the trie of every continuation's tokens but its last (the last is only predicted, never run)
    tokens, parents, depth = [], [], []
    children: list[dict[int, int]] = [{}]  # 0: the prompt's end
    paths = []
    for c in continuations:
        at, path = 0, []
        for t in c[:-1]:
            nxt = children[at].get(t)
            if nxt is None:
                tokens.append(t)
                parents.append(at)
                depth.append(1 + (depth[at - 1] if at else 0))
                children.append({})
                nxt = len(tokens)
                children[at][t] = nxt
            at = nxt
            path.append(at)
        paths.append(path)
    scores = [float(row.after_prompt[c[0]]) for c in continuations]
    if not tokens:
        return scores
    n, context = len(tokens), row.length
    device = model.device
    dtype = getattr(model, "dtype", torch.float32)
    rows_, cols_ = [], []
    for j in range(1, n + 1):  # each tree token sees itself and its ancestors
        at = j
        while at:
            rows_.append(j - 1)
            cols_.append(context + at - 1)
            at = parents[at - 1]
    mask = torch.full((1, 1, n, context + n), torch.finfo(dtype).min, dtype=dtype)
    mask[..., :context] = 0
    mask[0, 0, torch.tensor(rows_), torch.tensor(cols_)] = 0
    ids = torch.tensor([tokens], device=device)
    positions = torch.tensor([[context + d - 1 for d in depth]], device=device)
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=mask.to(device),
            position_ids=positions,
            past_key_values=row.cache,
            use_cache=True,
        ).logits[0]
        crop_to(row.cache, context)  # the prompt's cache as it was
        logp = torch.log_softmax(logits.float(), dim=-1)
        at = torch.tensor([j - 1 for path in paths for j in path])
        nxt = torch.tensor([t for c in continuations for t in c[1:]])
        picked = logp[at.to(logp.device), nxt.to(logp.device)].tolist()
        k = 0
        for i, path in enumerate(paths):
            scores[i] += sum(picked[k : k + len(path)])
            k += len(path)
    return scores


def choice_scores(model, tokenizer, prompts: list[str], choices: ChoiceSet) -> list[list[float]]:
    """[prompt][candidate]: log-sum-exp over the forms of log P(opening naming the candidate | prompt)."""
    openings = openings_ids(tokenizer, choices)
    return [
        combine_forms(score_prompt(model, tokenizer(prompt, add_special_tokens=False)["input_ids"], openings))
        for prompt in prompts
    ]


def openings_ids(tokenizer, choices: ChoiceSet) -> list[list[list[int]]]:
    """[form][candidate]: the token ids of each form's opening naming each candidate."""
    return [
        [tokenizer(f.format(name=m), add_special_tokens=False)["input_ids"] for m in choices.candidates]
        for f in choices.forms
    ]


def combine_forms(per_form: list[list[float]]) -> list[float]:
    """[candidate]: log-sum-exp of a candidate's scores over the forms."""
    return [_logsumexp([scores[i] for scores in per_form]) for i in range(len(per_form[0]))]


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def rank_of(scores: list[float], gold: int) -> int:
    """The right candidate's place when sorted by score, best first (ties: the earlier candidate first,
    so that a model with no preference is not scored right)."""
    return 1 + sum(1 for i, s in enumerate(scores) if s > scores[gold] or (s == scores[gold] and i < gold))
