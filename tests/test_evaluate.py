"""evaluation_report's functions: metrics on known strings, name extraction on the real answer
forms, batched generation = one-at-a-time generation, per-row loss = the model's own loss."""

import math

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.stages.evaluation_report import EvalConfig, evaluate_models, select_rows, tuned_beats_base
from pipeline.stages.evaluation_report.metrics import (
    bleu4_chars,
    extract_medicine_name,
    name_hit,
    rouge_words,
    text_scores,
)
from pipeline.stages.lora_adapter.generation import answer_losses, generate_greedy, stop_token_ids
from pipeline.stages.tokenized_dataset import render_prompt, tokenize_rows

REAL_FORMS = [
    ("香砂六君丸可能适合治疗您的病症。以下是香砂六君丸的详细说明书：【主要成分】木香、砂仁。", "香砂六君丸"),
    ("您的病症适用康妇消炎栓。以下是康妇消炎栓的详细说明书：【主要成分】苦参、败酱草。", "康妇消炎栓"),
    ("您的病症适用舒尔经胶囊。以下是舒尔经胶囊的详细说明书：【主要成分】当归。", "舒尔经胶囊"),
    ("地榆槐角丸可能适合治疗您的病症。以下是地榆槐角丸的详细说明书：【主要成分】地榆(炭)。", "地榆槐角丸"),
    ("以下是藿香正气水的说明书：【功能主治】解表化湿。", "藿香正气水"),
    ("建议服用六味地黄丸。【功能主治】滋阴补肾。", "六味地黄丸"),
]


@pytest.mark.parametrize("answer,name", REAL_FORMS)
def test_medicine_name_from_the_real_answer_forms(answer, name):
    assert extract_medicine_name(answer) == name


def test_name_hit_is_unknown_when_the_reference_names_nothing():
    assert extract_medicine_name("多喝热水，注意休息。") is None
    assert name_hit("多喝热水，注意休息。", "板蓝根颗粒") is None
    ref = "板蓝根颗粒可能适合治疗您的病症。以下是板蓝根颗粒的详细说明书。"
    assert name_hit(ref, "您可以试试板蓝根颗粒。") is True
    assert name_hit(ref, "您可以试试藿香正气水。") is False


def test_bleu_on_characters():
    assert bleu4_chars("板蓝根颗粒清热解毒", "板蓝根颗粒清热解毒") == pytest.approx(100.0)
    assert bleu4_chars("", "板蓝根") == 0.0
    partial = bleu4_chars("板蓝根颗粒清热", "板蓝根颗粒清热解毒，凉血利咽")
    assert 0 < partial < 100
    # characters, not words: one wrong character lowers the score, a reordered sentence more
    assert bleu4_chars("板蓝根颗粒清热解毒", "板蓝根颗粒清热解毒。") > bleu4_chars(
        "解毒清热颗粒板蓝根", "板蓝根颗粒清热解毒。"
    )


def test_rouge_on_jieba_words():
    same = rouge_words("板蓝根颗粒清热解毒，凉血利咽", "板蓝根颗粒清热解毒，凉血利咽")
    assert same == {"rouge_1": 100.0, "rouge_2": 100.0, "rouge_l": 100.0}
    assert rouge_words("", "板蓝根颗粒") == {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    import jieba

    ref, hyp = "板蓝根颗粒清热解毒，凉血利咽", "板蓝根颗粒清热解毒"
    r, h = list(jieba.cut(ref)), list(jieba.cut(hyp))
    # ROUGE-1 F from the word overlap, computed by hand
    overlap = sum(min(r.count(w), h.count(w)) for w in set(h))
    p, rec = overlap / len(h), overlap / len(r)
    assert rouge_words(hyp, ref)["rouge_1"] == pytest.approx(100 * 2 * p * rec / (p + rec), abs=0.01)
    assert text_scores(hyp, ref)["name_hit"] is None  # the reference names no medicine in a known form


def _summary(bl, tl, br, tr):
    return {"base": {"eval": {"loss": bl, "rouge_l": br}}, "tuned": {"eval": {"loss": tl, "rouge_l": tr}}}


def test_tuned_beats_base_gate():
    assert tuned_beats_base(_summary(2.0, 1.5, 10.0, 10.0))[0]
    ok, why = tuned_beats_base(_summary(2.0, 2.1, 10.0, 12.0))
    assert not ok and "loss" in why
    ok, why = tuned_beats_base(_summary(2.0, 1.5, 10.0, 9.0))
    assert not ok and "ROUGE-L" in why
    assert not tuned_beats_base({"base": {}, "tuned": {}})[0]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    model.eval()
    return model


def _prompts(tokenizer, n=6):
    return [
        render_prompt(
            tokenizer, "使用中医知识正确回答适合这个病例的中成药。", "咳嗽" * (k + 1) + f"病例{k}", "你是助手。"
        )
        for k in range(n)
    ]


def test_batched_generation_equals_one_at_a_time(tiny, tokenizer):
    prompts = _prompts(tokenizer, 6)  # different lengths: left padding is exercised
    stops = stop_token_ids(tokenizer)
    batched = generate_greedy(tiny, tokenizer, prompts, max_new_tokens=12, stop_ids=stops, batch_size=4)
    single = generate_greedy(tiny, tokenizer, prompts, max_new_tokens=12, stop_ids=stops, batch_size=1)
    assert batched == single
    assert all(len(x) > 0 for x in single)  # the tiny model does answer something


def test_greedy_answers_do_not_depend_on_the_batch_size(tiny_model_dir, tokenizer):
    """Prompts of many lengths decoded at batch 1, 7 and 32 in bf16 (the evaluation's dtype on
    CPU): the same tokens, and every step's logits the same bit for bit (a row attends over its own
    cache; a lone row is not a one-row matrix product)."""
    from pipeline.stages.lora_adapter.generation import decode_greedy, prefill

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, use_safetensors=True)
    model.eval()
    cases = ["咳嗽", "发热头痛", "腹胀，嗳气", "失眠多梦，心烦", "腰膝酸软，夜尿多"]
    prompts = [
        render_prompt(
            tokenizer,
            "使用中医知识正确回答适合这个病例的中成药。",
            cases[k % 5] * (1 + k % 7) + f"第{k}例",
            "你是助手。",
        )
        for k in range(32)
    ]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    logits: list = []
    model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out[:, -1].clone()))

    def decode(rows: list[int]) -> tuple[list[list[int]], list]:
        logits.clear()
        ready = [prefill(model, encoded[i]) for i in rows]
        logits.clear()  # the decode steps' logits only
        answers = decode_greedy(model, ready, max_new_tokens=16, stop_ids=[-1], pad_id=0)
        return answers, [step[: len(rows)] for step in logits]

    answers = {}
    for size in (1, 7, 32):
        answers[size], steps = [], []
        for start in range(0, 32, size):
            got, per_step = decode(list(range(start, min(start + size, 32))))
            answers[size] += got
            steps += [torch.stack([s[k] for s in per_step]) for k in range(len(got))]
        if size == 1:
            reference = steps
        assert all(torch.equal(a, b) for a, b in zip(steps, reference)), f"batch {size}: logits differ"
    assert all(len(a) == 16 for a in answers[1])
    assert answers[7] == answers[1] and answers[32] == answers[1]


def test_greedy_decoding_over_stacked_caches_equals_transformers_generate(tiny, tokenizer):
    """The stage's own decoding loop (prefill alone, caches stacked with left padding, fp32) gives
    what transformers' greedy ``generate`` gives for each prompt alone."""
    prompts = _prompts(tokenizer, 5)
    stops = stop_token_ids(tokenizer)
    ours = generate_greedy(tiny, tokenizer, prompts, max_new_tokens=10, stop_ids=stops, batch_size=5)
    for prompt, got in zip(prompts, ours):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = tiny.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )[0, ids.shape[1] :].tolist()
        assert got == ref[: next((k for k, t in enumerate(ref) if t in stops), len(ref))]


def test_per_row_answer_loss_equals_the_models_own_loss(tiny, tokenizer):
    rows = tokenize_rows(
        tokenizer, ["问"] * 3, ["短", "长一些的输入" * 3, ""], ["板蓝根颗粒", "六味地黄丸滋阴补肾", "好"], "系统", 256
    )
    pairs = [(r.input_ids, r.labels) for r in rows]
    batched = answer_losses(tiny, pairs, pad_id=tokenizer.pad_token_id or 0, batch_size=3)
    for (ids, labels), (total, n) in zip(pairs, batched):
        with torch.no_grad():
            own = tiny(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        assert n == sum(1 for t in labels[1:] if t != -100)
        assert total / n == pytest.approx(own, rel=1e-4)


def test_evaluate_models_side_by_side_table(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    alpaca = pd.DataFrame(
        {
            "record_id": [f"r{k}" for k in range(5)],
            "instruction": ["问"] * 5,
            "input": [f"病例{k}" for k in range(5)],
            "output": [
                "板蓝根颗粒可能适合治疗您的病症。",
                "您的病症适用逍遥丸。",
                "多喝水。",
                "保和丸可能适合治疗您的病症。",
                "好",
            ],
            "split": ["eval", "eval", "train", "train", "train"],
        }
    )
    toks = tokenize_rows(
        tokenizer, alpaca["instruction"].tolist(), alpaca["input"].tolist(), alpaca["output"].tolist(), "系统", 128
    )
    tok = alpaca[["record_id", "split"]].assign(input_ids=[t.input_ids for t in toks], labels=[t.labels for t in toks])
    rows = select_rows(
        alpaca, {"train": tok[tok.split == "train"], "eval": tok[tok.split == "eval"]}, train_sample_size=2, seed=1
    )
    assert list(rows["split"]).count("eval") == 2 and list(rows["split"]).count("train_sample") == 2
    again = select_rows(
        alpaca, {"train": tok[tok.split == "train"], "eval": tok[tok.split == "eval"]}, train_sample_size=2, seed=1
    )
    assert list(rows["record_id"]) == list(again["record_id"])  # a fixed sample
    from pipeline.stages.evaluation_report.choice import ChoiceSet

    cfg = EvalConfig(
        system_prompt="系统",
        max_new_tokens=6,
        batch_size=2,
        choices=ChoiceSet.from_answers(alpaca["output"].tolist()),
        train_medicines=frozenset({"保和丸"}),
    )
    result = evaluate_models(model, tokenizer, rows, cfg, stop_token_ids(tokenizer), log=lambda *_: None)
    t = result.table
    for col in (
        "prompt",
        "reference",
        "base_answer",
        "tuned_answer",
        "base_rouge_l",
        "tuned_rouge_l",
        "base_loss",
        "tuned_loss",
    ):
        assert col in t
    # the adapter (random, non-zero init) changes the model: the two losses differ
    assert (t["base_loss"] - t["tuned_loss"]).abs().max() > 1e-6
    s = result.summary
    assert s["base"]["eval"]["rows"] == 2 and s["tuned"]["train_sample"]["rows"] == 2
    assert s["base"]["eval"]["perplexity"] == pytest.approx(math.exp(s["base"]["eval"]["loss"]), rel=1e-3)
    assert s["base"]["eval"]["name_known_rows"] == 2  # both eval references name a medicine
    # the base half, kept, is reused for another adapter over the same base: the base model is not
    # run again (a model whose base answers differently proves it), and the tuned half is its own
    import json

    kept = json.loads(json.dumps(result.base, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    torch.manual_seed(1)
    other_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    with torch.no_grad():
        for p in other_base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = get_peft_model(
        other_base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    second = evaluate_models(other, tokenizer, rows, cfg, stop_token_ids(tokenizer), log=lambda *_: None, base=kept)
    assert second.summary["base"] == s["base"]
    assert second.table["base_loss"].fillna(-1).tolist() == t["base_loss"].fillna(-1).tolist()
    on_eval = t["split"] == "eval"  # the rows with an answer loss (the train sample's is off by default)
    assert second.table.loc[on_eval, "tuned_loss"].tolist() != t.loc[on_eval, "tuned_loss"].tolist()
    fresh = evaluate_models(other, tokenizer, rows, cfg, stop_token_ids(tokenizer), log=lambda *_: None)
    assert fresh.summary["base"]["eval"]["loss"] != s["base"]["eval"]["loss"]  # without it, the base would differ
    flat = result.flat_metrics()
    assert "base_eval_loss" in flat and "tuned_eval_rouge_l" in flat and "tuned_train_sample_bleu_4" in flat
    # medicine choice: both eval rows name a medicine (3 candidates); neither eval medicine was trained on
    assert s["tuned"]["eval"]["choice_rows"] == 2 and 1 <= s["tuned"]["eval"]["choice_rank"] <= 3
    assert (
        s["tuned"]["eval"]["seen_medicine_choice_rows"] == 0
        and s["tuned"]["eval"]["seen_medicine_choice_accuracy"] is None
    )
    assert {"tuned_eval_choice_accuracy", "base_eval_choice_rank", "tuned_eval_choice_rank"} <= set(flat)
    assert set(t["tuned_choice"].dropna()) <= {"板蓝根颗粒", "逍遥丸", "保和丸"}
    # the gate's paired counts: rows one model picks right and the other wrong
    for split in ("eval", "train_sample"):
        rows_ = t[t["split"] == split]
        base_right, tuned_right = rows_["base_choice_rank"] == 1, rows_["tuned_choice_rank"] == 1
        assert s["tuned"][split]["choice_only_base_right"] == int((base_right & ~tuned_right).sum())
        assert s["tuned"][split]["choice_only_tuned_right"] == int((tuned_right & ~base_right).sum())
    # the train sample's answer loss is off by default: those rows run their prompt alone, and give
    # the same answers and choices as with the whole answer run for its loss (causal attention)
    assert s["tuned"]["train_sample"]["loss"] is None and s["base"]["train_sample"]["perplexity"] is None
    assert (
        t.loc[t["split"] == "train_sample", "tuned_loss"].isna().all()
        and t.loc[t["split"] == "eval", "tuned_loss"].notna().all()
    )
    full = evaluate_models(
        model,
        tokenizer,
        rows,
        cfg.model_copy(update={"train_sample_loss": True}),
        stop_token_ids(tokenizer),
        log=lambda *_: None,
    )
    assert full.summary["tuned"]["train_sample"]["loss"] > 0 and full.table["tuned_loss"].notna().all()
    for col in ("base_answer", "tuned_answer", "base_choice", "tuned_choice", "base_choice_rank", "tuned_choice_rank"):
        assert full.table[col].fillna(-1).tolist() == t[col].fillna(-1).tolist(), col
    assert full.summary["tuned"]["eval"]["loss"] == pytest.approx(s["tuned"]["eval"]["loss"], rel=1e-6)


# ------------------------------------------------------------------ medicine choice by likelihood


def test_answer_forms_and_candidates_are_read_from_the_data():
    from pipeline.stages.evaluation_report.choice import ChoiceSet, answer_form

    answers = [
        "板蓝根颗粒可能适合治疗您的病症。以下是板蓝根颗粒的详细说明书：【功能主治】清热。",
        "您的病症适用逍遥丸。以下是逍遥丸的详细说明书：【功能主治】疏肝。",
        "您的病症适用保和丸。以下是保和丸的详细说明书。",
        "多喝水。",
    ]
    assert answer_form(answers[0], "板蓝根颗粒") == "{name}可"
    assert answer_form(answers[1], "逍遥丸") == "您的病症适用{name}。"
    choices = ChoiceSet.from_answers(answers)
    assert choices.candidates == sorted(["板蓝根颗粒", "逍遥丸", "保和丸"])
    assert choices.forms == ["您的病症适用{name}。", "{name}可"]  # most common first
    assert not ChoiceSet.from_answers(["多喝水。", "板蓝根颗粒可能适合治疗您的病症。"])  # one medicine: no choice


def test_scoring_over_the_prompt_cache_equals_full_forwards(tiny, tokenizer):
    from pipeline.stages.evaluation_report.choice import score_prompt

    prompt = tokenizer(_prompts(tokenizer, 1)[0], add_special_tokens=False)["input_ids"]

    def full(c):
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([prompt + c])).logits[0].float(), -1)
        return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(c))

    for texts in (
        ("板蓝根颗粒可能适合", "您的病症适用逍遥丸。", "好"),  # nothing shared
        ("您的病症适用逍遥丸。", "您的病症适用保和丸。", "您的病症适用板蓝根颗粒。", "您的病症适用"),
    ):  # a shared start
        conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        (got,) = score_prompt(tiny, prompt, [conts], batch_size=2)  # two batches, right padding in the first
        for c, value in zip(conts, got):
            assert value == pytest.approx(full(c), abs=1e-4)


class _Cache:
    """The token ids run so far, with the cache calls the scoring makes."""

    def __init__(self, ids):
        self.ids = ids

    def get_seq_length(self):
        return self.ids.shape[1]

    def crop(self, n):
        self.ids = self.ids[:, :n]


class _EchoModel(torch.nn.Module):
    """A model whose preferences we control: it favours, at every position, the tokens that occur in
    the prompt (by 20 nats each), so the medicine a prompt names is the one it should choose."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.device = torch.device("cpu")

    def forward(
        self, input_ids, attention_mask=None, past_key_values=None, use_cache=True, logits_to_keep=0, position_ids=None
    ):
        prompt = past_key_values.ids if past_key_values is not None else input_ids
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for b in range(input_ids.shape[0]):
            logits[b, :, prompt[b].unique()] = 20.0
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        cache = past_key_values or _Cache(input_ids[:, :0])
        cache.ids = torch.cat([cache.ids, input_ids], dim=1)
        return type("Out", (), {"logits": logits, "past_key_values": cache})()


def test_choice_accuracy_and_rank_follow_the_models_preferences(tokenizer):
    from pipeline.stages.evaluation_report.choice import ChoiceSet, choice_scores, rank_of

    meds = ["板蓝根颗粒", "逍遥丸", "藿香正气水", "六味地黄丸"]
    choices = ChoiceSet(candidates=sorted(meds), forms=["{name}可", "您的病症适用{name}。"])
    model = _EchoModel(len(tokenizer))
    prompts = [f"<|im_start|>user\n听说{m}不错<|im_end|>\n<|im_start|>assistant\n" for m in meds]
    scores = choice_scores(model, tokenizer, prompts, choices)
    for m, s in zip(meds, scores):
        assert rank_of(s, choices.candidates.index(m)) == 1  # the named medicine comes first
        assert choices.candidates[max(range(len(s)), key=s.__getitem__)] == m
    # a prompt that names another medicine puts the right one lower
    wrong = choice_scores(model, tokenizer, [prompts[1]], choices)[0]
    assert rank_of(wrong, choices.candidates.index(meds[0])) > 1
    # no preference at all: ties do not count as right unless the right one is listed first
    assert rank_of([0.0, 0.0, 0.0], 2) == 3 and rank_of([0.0, 0.0, 0.0], 0) == 1


def test_choice_metrics_in_the_summary_and_the_gate():
    ok, why = tuned_beats_base(
        {
            "base": {"eval": {"loss": 2.0, "rouge_l": 5.0, "choice_accuracy": 0.5}},
            "tuned": {"eval": {"loss": 1.5, "rouge_l": 6.0, "choice_accuracy": 0.25}},
        }
    )
    assert not ok and "choice accuracy went down" in why
    ok, why = tuned_beats_base(
        {
            "base": {"eval": {"loss": 2.0, "rouge_l": 5.0, "choice_accuracy": 0.5}},
            "tuned": {"eval": {"loss": 1.5, "rouge_l": 6.0, "choice_accuracy": 0.5}},
        }
    )
    assert ok and "choice accuracy 0.50 → 0.50" in why


def test_the_gate_weighs_a_fall_in_choice_accuracy_against_chance():
    """Held-out choice is right or wrong on a handful of rows: the base model's one lucky pick among
    7 (1 row only it gets right, none only the tuned one) does not block; 5 against 0 does (sign
    test p 0.03); without the paired counts (an evaluation kept from before) any fall blocks."""
    from pipeline.stages.evaluation_report.report import sign_test_p

    assert sign_test_p(1, 0) == 0.5 and sign_test_p(5, 0) == 1 / 32 and sign_test_p(0, 0) == 1.0
    assert abs(sign_test_p(6, 2) - 37 / 256) < 1e-12  # P(X >= 6 | n 8)

    def summary(base_acc, tuned_acc, **paired):
        return {
            "base": {"eval": {"loss": 3.0, "rouge_l": 6.0, "choice_accuracy": base_acc}},
            "tuned": {"eval": {"loss": 0.9, "rouge_l": 24.0, "choice_accuracy": tuned_acc, **paired}},
        }

    ok, why = tuned_beats_base(summary(1 / 7, 0.0, choice_only_base_right=1, choice_only_tuned_right=0))
    assert (
        ok
        and "lower within chance: 1 row(s) only the base model picks right, 0 only the tuned one (sign test p 0.50)"
        in why
    )
    ok, why = tuned_beats_base(summary(5 / 7, 0.0, choice_only_base_right=5, choice_only_tuned_right=0))
    assert not ok and "went down" in why and "sign test p 0.03" in why
    assert not tuned_beats_base(summary(1 / 7, 0.0))[0]


def test_the_per_row_table_puts_the_case_first_and_says_who_was_right():
    import pandas as pd

    from pipeline.stages.evaluation_report.report import row_table

    table = pd.DataFrame(
        {
            "record_id": ["a", "b"],
            "split": ["eval", "train_sample"],
            "prompt": ["指令\n病例一\n第二行", "只有问题"],
            "medicine": ["保和丸", None],
            "base_answer": ["x", "y"],
            "tuned_answer": ["z", "w"],
            "base_choice_rank": [1.0, None],
            "tuned_choice_rank": [2.0, None],
            "tuned_rouge_l": [10.0, 0.0],
        }
    )
    rows = row_table(table)
    assert rows["question"].tolist() == ["病例一\n第二行", "只有问题"]
    assert rows["instruction"].tolist() == ["指令", ""]
    assert rows["base_right"].tolist() == [True, None] and rows["tuned_right"].tolist() == [False, None]
    assert "base_choice" not in rows and rows["tuned_rouge_l"].tolist() == [10.0, 0.0]  # columns not scored: left out
