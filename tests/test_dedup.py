import pandas as pd
import pytest

from pipeline.stages.deduplicated_records import deduplicate, normalize_array, normalize_text, stable_id


def frame(rows, file="f.json"):
    df = pd.DataFrame(rows, columns=["instruction", "input", "output"])
    df.insert(0, "source_file", file)
    df.insert(1, "source_line", range(1, len(df) + 1))
    df.insert(2, "source_index", range(len(df)))
    return df.astype({"instruction": "str", "input": "str", "output": "str"})


def test_normalisation():
    assert normalize_text("  Ａ１\u3000 b\n\t c  ") == "A1 b c"
    assert normalize_text("一次５～１０克") == normalize_text("一次5～10克")
    samples = ["  Ａ１\u3000 b\n\t c  ", "中文，标点。", "x\u00a0y", "ｆｕｌｌ　ｗｉｄｔｈ", ""]
    assert normalize_array(pd.Series(samples, dtype="str")).to_pylist() == [normalize_text(s) for s in samples]


def test_exact_whitespace_and_full_width_duplicates_keep_the_first():
    df = frame(
        [
            ("问", "咳嗽 发热", "板蓝根颗粒，一次5克"),
            ("问", "咳嗽 发热", "板蓝根颗粒，一次5克"),  # exact
            (" 问\t", "  咳嗽\n\n发热 ", "板蓝根颗粒，一次5克  "),  # whitespace variant
            ("问", "咳嗽 发热", "板蓝根颗粒，一次５克"),  # full-width digit
        ]
    )
    r = deduplicate(df)
    assert r.kept["source_line"].tolist() == [1]
    assert r.rejected["source_line"].tolist() == [2, 3, 4]
    assert all(x.startswith("duplicate of f.json:1") for x in r.rejected["reason"])
    assert set(r.rejected["stage"]) == {"dedup"}


def test_shared_answer_with_different_prompts_is_not_a_duplicate():
    df = frame([("问", "头痛", "同一个答案"), ("问", "腰痛", "同一个答案")])
    r = deduplicate(df)
    assert len(r.kept) == 2 and r.rejected.empty
    assert r.stats["conflict_groups"] == 0


@pytest.mark.parametrize(
    "policy,kept,rejected", [("keep_first", [1, 3, 4], [2]), ("keep_all", [1, 2, 3, 4], []), ("drop", [3, 4], [1, 2])]
)
def test_conflict_policies(policy, kept, rejected):
    df = frame(
        [("问", "头痛", "答案一"), ("问", " 头痛", "答案二"), ("问", "腰痛", "答案三"), ("问", "头痛", "答案一")]
    )
    # row 4 is an exact duplicate of row 1, so it goes first; rows 1 and 2 conflict
    df = df.iloc[[0, 1, 2]].reset_index(drop=True)
    df = pd.concat([df, frame([("问", "腹痛", "答案四")]).assign(source_line=4, source_index=3)], ignore_index=True)
    r = deduplicate(df, policy)
    assert r.kept["source_line"].tolist() == kept
    assert r.rejected["source_line"].tolist() == rejected
    assert r.stats["conflict_groups"] == 1 and r.stats["conflict_rows"] == 2
    assert r.stats["conflicts"][0]["sources"] == ["f.json:1", "f.json:2"]
    for reason in r.rejected["reason"]:
        assert reason.startswith("conflict:") and policy in reason


def test_record_and_prompt_ids_are_stable_hashes_of_the_normalised_text():
    df = frame([(" 问 ", "咳嗽", "答")])
    r = deduplicate(df)
    assert r.kept["record_id"].item() == stable_id("问", "咳嗽", "答")
    assert r.kept["prompt_id"].item() == stable_id("问", "咳嗽")
    assert len(r.kept["record_id"].item()) == 32


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="conflict_policy"):
        deduplicate(frame([("a", "b", "c")]), "newest")


def test_empty_input():
    r = deduplicate(frame([]))
    assert r.kept.empty and r.rejected.empty


def test_true_nfkc_composition():
    """pyarrow's utf8_normalize does not compose; the result must still be NFKC."""
    import unicodedata

    values = ["\u00d9", "U\u0300", "한국어", "\u1112\u1161\u11ab", "ｶﾞ", "①", "e\u0301\u0323"]
    got = normalize_array(pd.Series(values, dtype="str")).to_pylist()
    assert got == [unicodedata.normalize("NFKC", v) for v in values]
    r = deduplicate(frame([("问", "\u00d9", "答"), ("问", "U\u0300", "答")]))
    assert r.rejected["source_line"].tolist() == [2]


def test_first_of_group_matches_a_row_by_row_reference_with_64_bit_collisions():
    """Keys drawn from a few values, so that many rows share a key and many share only the high half
    (a collision of the half the sort uses): each row's first row with the same whole key."""
    import numpy as np

    from pipeline.stages.deduplicated_records.keys import first_of_group

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 200))
        keys = rng.integers(0, 4, size=(n, 2)).astype(np.uint64) * np.uint64(2**61)
        seen: dict[tuple[int, int], int] = {}
        expected = [seen.setdefault((int(a), int(b)), i) for i, (a, b) in enumerate(keys)]
        assert first_of_group(keys).tolist() == expected
    assert first_of_group(np.zeros((0, 2), dtype=np.uint64)).tolist() == []
