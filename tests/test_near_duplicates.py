"""Near-duplicate prompts: datasketch's MinHash and MinHashLSH semantics,
computed a chunk at a time; the report/drop policy of ``deduplicated_records``; near duplicates kept
in one split by ``alpaca_dataset``, and the check that finds a held-out prompt's near twin in train."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from conftest import rec, write_jsonl
from pipeline.core.records import StagedRows
from pipeline.stages.alpaca_dataset import build_alpaca, near_twins_across_splits, write_alpaca, write_parquet
from pipeline.stages.deduplicated_records import NEAR_THRESHOLD, deduplicate, deduplicate_to
from pipeline.stages.deduplicated_records.keys import prompt_keys
from pipeline.stages.deduplicated_records.minhash import (
    NUM_PERM,
    WEIGHTS,
    band_keys,
    lsh_bands,
    shingle_hash,
    signatures,
)
from pipeline.stages.deduplicated_records.near import Sketches, distinct_rows, near_groups, sketch
from pipeline.stages.raw_records import ingest_to
from pipeline.stages.validated_records import validate_to

INSTR = "使用中医知识正确回答适合这个病例的中成药。"
# prompts in the style of the real data (not copied from it): distinct questions, one shared instruction
CASES = [
    "我前几天吃了很多食物，但肚子总是不舒服，咕咕响，还经常嗳气反酸，大便不成形，脸色也差极了。",
    "最近总是感到腰膝酸软，舌淡，晚上睡不好，还有总是感觉到两肋隐隐作痛。",
    "孩子发烧两天了，咳嗽有黄痰，嗓子红肿，不爱吃饭，大便有点干。",
    "这几天鼻塞流清涕，怕冷，头痛，身上酸痛，没有出汗。",
    "有没有能够滋养肝肾、清热明目的中药？眼睛干涩，看东西模糊。",
    "经常心慌气短，稍微活动一下就出汗，面色发白，容易疲劳。",
]


def reference_minhash(text: str) -> MinHash:
    """datasketch's own MinHash over the shingles, cut in plain Python (no shared code but the hash)."""
    t = "".join(c for c in text.lower() if c.isalnum())
    t = t + "\0" if len(t) == 1 else t
    m = MinHash(num_perm=NUM_PERM, seed=1, hashfunc=shingle_hash)
    m.update_batch([(ord(a) << 21) | ord(b) for a, b in zip(t, t[1:])])
    return m


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    return df.assign(source_file="cases.json", source_line=range(1, len(df) + 1), source_index=range(len(df)))[
        ["source_file", "source_line", "source_index", "instruction", "input", "output"]
    ]


def one_char_edit(text: str, rng: random.Random) -> str:
    i = rng.choice([k for k, c in enumerate(text) if c.isalnum()])
    return text[:i] + "某" + text[i + 1 :]


def test_signatures_are_datasketch_minhash_values():
    rng = random.Random(3)
    texts = (
        CASES
        + ["", "？！", "a", "中", "Hello, World", "ab", None]
        + ["".join(rng.choice("感冒发热咳嗽头痛abc，。 123") for _ in range(rng.randint(0, 40))) for _ in range(200)]
    )
    sig, has = signatures(pa.array(texts, pa.large_string()))
    for t, s, h in zip(texts, sig, has):
        m = reference_minhash(t or "")
        assert h == (not m.is_empty()), t
        assert np.array_equal(s, m.hashvalues), t


def test_bands_are_datasketch_lsh_bands_and_groups_match_its_queries():
    """For a threshold, the bands are MinHashLSH's; the groups are the connected components of what
    MinHashLSH.query returns for each prompt."""
    rng = random.Random(5)
    texts = (
        CASES + [one_char_edit(c, rng) for c in CASES for _ in range(2)] + [c.replace("，", "。") for c in CASES[:3]]
    )
    texts = [INSTR + "\x1f" + t for t in texts]
    sig, has = signatures(pa.array(texts, pa.large_string()))
    for threshold in (0.5, NEAR_THRESHOLD, 0.95):
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=WEIGHTS)
        assert lsh_bands(threshold) == (lsh.b, lsh.r)
        for i, s in enumerate(sig):
            lsh.insert(i, LeanMinHash(seed=1, hashvalues=s, scheme="affine32"))
        parent = list(range(len(texts)))

        def root(x, parent=parent):
            while parent[x] != x:
                x = parent[x]
            return x

        for i, s in enumerate(sig):
            for j in lsh.query(LeanMinHash(seed=1, hashvalues=s, scheme="affine32")):
                a, b = sorted((root(i), root(j)))
                parent[b] = a
        expected = {i: min(k for k in range(len(texts)) if root(k) == root(i)) for i in range(len(texts))}
        expected = {i: h for i, h in expected.items() if any(root(k) == root(i) for k in range(len(texts)) if k != i)}
        rows, heads = near_groups(band_keys(sig, has, lsh.b, lsh.r))
        assert dict(zip(rows.tolist(), heads.tolist())) == expected, threshold


def test_candidates_are_kept_only_when_their_sketches_agree():
    """Rows sharing a band are linked only when their sketches agree on at least the threshold."""
    keys = np.array([[1, 10], [1, 11], [2, 12], [2, 13], [3, 14]], dtype=np.uint32)
    base = np.arange(64, dtype=np.uint8)
    sk = np.stack(
        [base, np.where(base < 56, base, base + 100), base, np.where(base < 50, base, base + 100), base]
    ).astype(np.uint8)
    held = Sketches()
    held.add(sk)
    rows, heads = near_groups(keys, held, 0.85)  # 56/64 = 0.875 passes, 50/64 = 0.78 does not
    assert rows.tolist() == [0, 1] and heads.tolist() == [0, 0]


def test_sketches_in_a_file_read_back_as_held(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, (n, 64)).astype(np.uint8) for n in (5, 0, 17, 3)]
    with Sketches(tmp_path / "s.bin") as on_disk:
        for p in parts:
            on_disk.add(p)
        rows = np.array([0, 4, 5, 21, 24])
        assert np.array_equal(on_disk.take(rows, block=4), np.concatenate(parts)[rows])
    assert not (tmp_path / "s.bin").exists()
    sig, _ = signatures(pa.array(CASES, pa.large_string()))
    assert sketch(sig).shape == (len(CASES), 64) and np.array_equal(sketch(sig), sig[:, :64] & 0xFF)


def test_distinct_rows_is_the_sorted_union():
    rng = np.random.default_rng(2)
    for n in (0, 1, 50, 1000):
        a, b = rng.integers(0, 3 * n + 1, n), rng.integers(0, 7, n)
        assert np.array_equal(distinct_rows(a, b), np.unique(np.concatenate([a, b])))
    assert distinct_rows(np.array([], dtype=np.int64)).tolist() == []


def test_groups_are_connected_components_of_shared_bands():
    """Key 0 (a prompt without letters or digits) is shared with nobody."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, b = int(rng.integers(1, 40)), int(rng.integers(1, 4))
        keys = rng.integers(0, int(rng.integers(1, 30)), (n, b)).astype(np.uint32)  # few values: long runs
        linked = {
            (i, j) for i, j in itertools.combinations(range(n), 2) if ((keys[i] == keys[j]) & (keys[i] != 0)).any()
        }
        group = {i: {i} for i in range(n)}
        for i, j in linked:
            merged = group[i] | group[j]
            for k in merged:
                group[k] = merged
        expected = {i: min(g) for i, g in group.items() if len(g) > 1}
        rows, heads = near_groups(keys)
        assert dict(zip(rows.tolist(), heads.tolist())) == expected


def test_a_changed_character_or_punctuation_is_a_near_duplicate_and_a_shared_answer_is_not():
    rng = random.Random(11)
    rows = [rec(c, f"答案{i}") for i, c in enumerate(CASES)]
    rows.append(rec(CASES[0].replace("，", "、").replace("。", "！"), "另一个答案"))  # punctuation only
    rows.append(rec(one_char_edit(CASES[1], rng), "答案1"))  # one character
    rows.append(rec("头晕乏力，口干舌燥，夜里盗汗。", "答案2"))  # only the answer is shared with row 3
    result = deduplicate(frame(rows))
    s = result.stats
    assert s["near_duplicate_groups"] == 2 and s["near_duplicate_rows"] == 4 and s["near_duplicates_rejected"] == 0
    assert [g["sources"] for g in s["near_duplicates"]] == [
        ["cases.json:1", "cases.json:7"],
        ["cases.json:2", "cases.json:8"],
    ]
    assert all(NEAR_THRESHOLD <= g["similarity"] <= 1.0 for g in s["near_duplicates"])
    kept = result.kept.set_index("source_line")
    assert len(kept) == len(rows)  # report keeps every row
    assert (
        kept.at[7, "near_group_id"] == kept.at[1, "prompt_id"]
        and kept.at[8, "near_group_id"] == kept.at[2, "prompt_id"]
    )
    others = kept.drop(index=[7, 8])
    assert (others["near_group_id"] == others["prompt_id"]).all()


def test_drop_keeps_the_first_prompt_and_names_it_in_the_reason():
    rows = [rec(CASES[0], "a"), rec(CASES[2], "b"), rec(CASES[0].replace("，", " "), "c"), rec(CASES[0] + "!", "d")]
    result = deduplicate(frame(rows), near_duplicate_policy="drop")
    assert result.kept["source_line"].tolist() == [1, 2]
    assert result.rejected["source_line"].tolist() == [3, 4]
    assert all(
        r.startswith("near duplicate of cases.json:1") and "near_duplicate_policy drop" in r
        for r in result.rejected["reason"]
    )
    assert (
        result.stats["near_duplicates_rejected"] == 2 and result.stats["near_duplicates"][0]["kept"] == "cases.json:1"
    )


def test_same_prompt_different_answers_stays_a_conflict():
    rows = [rec(CASES[0], "甲"), rec(CASES[0], "乙"), rec(CASES[1], "丙")]
    for policy in ("report", "drop"):
        s = deduplicate(frame(rows), conflict_policy="keep_all", near_duplicate_policy=policy).stats
        assert s["conflict_groups"] == 1 and s["near_duplicate_groups"] == 0 and s["rows_kept"] == 3


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5])
def test_the_threshold_is_a_similarity(bad):
    with pytest.raises(ValueError, match="near_duplicate_threshold"):
        deduplicate(frame([rec(CASES[0], "a")]), near_duplicate_threshold=bad)
    with pytest.raises(ValueError, match="near_duplicate_policy"):
        deduplicate(frame([rec(CASES[0], "a")]), near_duplicate_policy="ignore")


def many_cases(n: int, seed: int) -> list[dict]:
    """``n`` distinct case prompts, every fifth one followed by a near copy of itself."""
    rng = random.Random(seed)
    words = [
        "咳嗽",
        "发热",
        "咽喉肿痛",
        "头痛",
        "腹胀",
        "失眠多梦",
        "腰膝酸软",
        "口干",
        "便秘",
        "恶心",
        "胸闷",
        "乏力",
        "盗汗",
        "耳鸣",
        "食欲不振",
        "心悸",
        "鼻塞流涕",
        "反酸",
        "眩晕",
        "怕冷",
        "出汗多",
        "面色萎黄",
        "舌苔厚腻",
        "小便黄",
    ]
    rows = []
    for i in range(n):
        case = f"{rng.choice(['男', '女'])}，{rng.randint(3, 90)}岁，" + "，".join(rng.sample(words, 9)) + "。"
        rows.append(rec(case, f"答案{i}"))
        if i % 5 == 0:
            rows.append(rec(one_char_edit(case, rng), f"答案{i}"))
    return rows


def test_alpaca_keeps_each_group_in_one_split_and_the_check_finds_twins_when_not(tmp_path):
    rows = many_cases(400, seed=2)
    raw = tmp_path / "raw"
    write_jsonl(raw / "cases.jsonl", rows)
    staged = validate_to(ingest_to(raw, tmp_path / "st" / "raw"), tmp_path / "st" / "valid")
    d = deduplicate_to(staged, tmp_path / "st" / "dedup", chunk_rows=64)
    # 80 planted pairs at Jaccard 0.91-0.96 (67-74 found with seeds 2-7; LSH is a probabilistic
    # filter): most found, and nothing but them (the shared template makes other prompts up to 0.7
    # alike, which the sketches reject)
    assert (
        64 <= d.stats["near_duplicate_groups"] <= 80
        and d.stats["near_duplicate_rows"] == 2 * d.stats["near_duplicate_groups"]
    )
    counts = write_alpaca(d, tmp_path / "alpaca.parquet", 0.3, chunk_rows=64)
    assert counts["near_duplicate_groups_kept_together"] == d.stats["near_duplicate_groups"]
    assert counts["rows_moved_to_their_group_split"] > 0
    found = near_twins_across_splits(tmp_path / "alpaca.parquet", NEAR_THRESHOLD, chunk_rows=64)
    assert found == {"groups": 0, "rows": 0, "held_out_rows": 0, "examples": []}
    # the same rows split by prompt alone: some pairs straddle the split, and the check names them
    kept = pd.concat(StagedRows(d.folder, d.stats).iter_kept(10_000))
    write_parquet(build_alpaca(kept.drop(columns="near_group_id"), 0.3), tmp_path / "by_prompt.parquet")
    leaks = near_twins_across_splits(tmp_path / "by_prompt.parquet", NEAR_THRESHOLD, chunk_rows=64)
    assert leaks["groups"] > 0 and leaks["held_out_rows"] == leaks["groups"]
    eval_at, train_at = leaks["examples"][0]
    alpaca = pd.read_parquet(tmp_path / "by_prompt.parquet").set_index("source_line")
    assert (
        alpaca.at[int(eval_at.split(":")[1]), "split"] == "eval"
        and alpaca.at[int(train_at.split(":")[1]), "split"] == "train"
    )


def test_streamed_with_workers_matches_in_memory(tmp_path):
    rows = many_cases(120, seed=4)
    raw = tmp_path / "raw"
    write_jsonl(raw / "cases.jsonl", rows)
    staged = validate_to(ingest_to(raw, tmp_path / "st" / "raw"), tmp_path / "st" / "valid")
    whole = deduplicate(pd.concat(staged.iter_kept(10_000)).reset_index(drop=True), near_duplicate_policy="drop")
    for workers in (None, 2):
        d = deduplicate_to(
            staged, tmp_path / f"dedup{workers}", chunk_rows=16, workers=workers, near_duplicate_policy="drop"
        )
        kept = pd.concat(d.iter_kept(10_000)).reset_index(drop=True)
        assert kept.equals(whole.kept)

        def figures(stats):
            return {k: v for k, v in stats.items() if k not in ("workers", "seconds")}

        assert figures(d.stats) == figures(whole.stats)


def test_prompt_keys_text_is_what_is_compared():
    """Instruction and input are compared as one prompt; the answer takes no part."""
    f = frame([rec("腹胀", "甲", instruction="问题"), rec("腹胀", "完全不同的回答", instruction="问题")])
    text = prompt_keys(f)[2]
    assert text.to_pylist() == ["问题\x1f腹胀"] * 2


def test_through_dagster_groups_are_reported_kept_together_and_dropped_on_request(tmp_path, tiny_model_dir):
    from test_dagster_data import meta, run

    distinct = list({r["output"]: r for r in reversed(many_cases(12, seed=9))}.values())[::-1]  # no planted copies
    assert len(distinct) == 12
    twins = [
        rec(distinct[3]["input"].replace("，", "、"), "另一个答案"),
        rec(distinct[7]["input"].replace("，", " "), "答案7"),
    ]
    write_jsonl(tmp_path / "data" / "raw" / "cases.jsonl", distinct + twins)
    result = run(tmp_path / "data", tiny_model_dir)
    assert result.success
    assert meta(result, "deduplicated_records", "near_duplicate_groups") == 2
    assert "cases.jsonl:4, cases.jsonl:13" in meta(result, "deduplicated_records", "near_duplicates")
    assert meta(result, "alpaca_dataset", "near_duplicate_groups_kept_together") == 2
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["no_near_twin_across_splits"] is True
    alpaca = pd.read_parquet(tmp_path / "data" / "processed" / "alpaca.parquet").set_index("source_line")
    assert alpaca.at[4, "split"] == alpaca.at[13, "split"] and alpaca.at[8, "split"] == alpaca.at[14, "split"]

    dropped = run(
        tmp_path / "data", tiny_model_dir, {"deduplicated_records": {"config": {"near_duplicate_policy": "drop"}}}
    )
    assert dropped.success
    rejected = pd.read_parquet(tmp_path / "data" / "processed" / "rejected.parquet").set_index("source_line")
    assert sorted(rejected.index) == [13, 14]
    assert rejected.at[13, "reason"].startswith("near duplicate of cases.jsonl:4")
