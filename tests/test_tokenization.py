import json

import pandas as pd
import pytest

from pipeline.stages.tokenized_dataset import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    cache_key,
    end_of_turn_id,
    render_prompt,
    tokenize_dataset,
    tokenize_rows,
)


def alpaca(rows):
    return pd.DataFrame(
        {
            "record_id": [f"r{i}" for i in range(len(rows))],
            "instruction": [r[0] for r in rows],
            "input": [r[1] for r in rows],
            "output": [r[2] for r in rows],
            "split": [r[3] if len(r) > 3 else "train" for r in rows],
        }
    )


def test_end_of_turn_is_im_end(tokenizer):
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_supervised_tokens_decode_to_exactly_the_answer_and_end_of_turn(tokenizer):
    answer = "板蓝根颗粒可能适合治疗您的病症。\n【用法用量】开水冲服，一次5～10克。"
    (row,) = tokenize_rows(tokenizer, ["使用中医知识回答。"], ["咽喉肿痛"], [answer], DEFAULT_SYSTEM_PROMPT, 1024)
    supervised = [t for t, l in zip(row.input_ids, row.labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == answer + "<|im_end|>"
    # every prompt token is masked and the prompt is the chat template's generation prompt
    first = next(i for i, l in enumerate(row.labels) if l != IGNORE_INDEX)
    assert all(l == IGNORE_INDEX for l in row.labels[:first])
    assert tokenizer.decode(row.input_ids[:first]) == render_prompt(
        tokenizer, "使用中医知识回答。", "咽喉肿痛", DEFAULT_SYSTEM_PROMPT
    )
    assert row.labels[first:] == row.input_ids[first:]
    assert not row.truncated


def test_user_turn_joins_instruction_and_input(tokenizer):
    text = render_prompt(tokenizer, "指令", "输入", "系统")
    assert "<|im_start|>system\n系统<|im_end|>" in text
    assert "<|im_start|>user\n指令\n输入<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n指令<|im_end|>" in render_prompt(tokenizer, "指令", "", "系统")


def test_long_rows_keep_the_prompt_and_lose_the_end_of_the_answer(tokenizer):
    prompt_len = len(tokenizer(render_prompt(tokenizer, "问", "", "S"), add_special_tokens=False)["input_ids"])
    long_answer = "很长的答案" * 50
    rows = tokenize_rows(tokenizer, ["问", "问" * 200], ["", ""], [long_answer, "答"], "S", prompt_len + 10)
    row, too_long = rows
    assert too_long is None
    assert len(row.input_ids) == prompt_len + 10 and row.truncated
    assert sum(l != IGNORE_INDEX for l in row.labels) == 10
    assert row.input_ids[-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_cache_key_changes_with_every_component():
    base = dict(data_fingerprint="d", tokenizer_fingerprint="t", chat_template="c", max_seq_len=512, system_prompt="s")
    k = cache_key(**base)
    assert k == cache_key(**base)
    for field, value in [
        ("data_fingerprint", "d2"),
        ("tokenizer_fingerprint", "t2"),
        ("chat_template", "c2"),
        ("max_seq_len", 1024),
        ("system_prompt", "s2"),
    ]:
        assert cache_key(**{**base, field: value}) != k, field


def test_tokenize_dataset_writes_splits_and_reuses_the_cache(tokenizer, tmp_path):
    df = alpaca([("问", f"症状{i}", f"答案{i}" * 3, "eval" if i == 0 else "train") for i in range(6)])
    kw = dict(data_fingerprint="abc", tokenizer_fingerprint="tok", out_root=tmp_path, max_seq_len=256)
    first = tokenize_dataset(df, tokenizer, **kw)
    assert not first.cache_hit
    assert len(first.load("train")) == 5 and len(first.load("eval")) == 1
    assert first.stats["truncated_rows"] == 0 and 0 < first.stats["supervised_share"] < 1
    manifest = json.loads((tmp_path / first.key[:16] / "manifest.json").read_text())
    assert manifest["max_seq_len"] == 256 and manifest["end_of_turn_id"] == end_of_turn_id(tokenizer)
    mtime = first.split_path("train").stat().st_mtime_ns
    second = tokenize_dataset(df, tokenizer, **kw)
    assert second.cache_hit and second.path == first.path
    assert second.split_path("train").stat().st_mtime_ns == mtime
    other = tokenize_dataset(df, tokenizer, **{**kw, "max_seq_len": 128})
    assert not other.cache_hit and other.path != first.path
    row = first.load("eval").iloc[0]
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"]


def test_prompt_too_long_rows_are_counted(tokenizer, tmp_path):
    df = alpaca([("问" * 400, "", "答"), ("问", "", "答")])
    ds = tokenize_dataset(
        df, tokenizer, data_fingerprint="x", tokenizer_fingerprint="t", out_root=tmp_path, max_seq_len=160
    )
    assert ds.stats["rows"] == 1 and ds.stats["prompt_too_long_rows"] == 1
    assert ds.stats["prompt_too_long_ids"] == ["r0"]


def test_missing_chat_template_is_refused(tokenizer):
    import copy

    t = copy.deepcopy(tokenizer)
    t.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_rows(t, ["a"], [""], ["b"], "s", 64)
