import hashlib

import pandas as pd
import pyarrow.parquet as pq

from pipeline.stages.alpaca_dataset import assign_split, build_alpaca, write_parquet


def ids(n, salt=""):
    return pd.Series([hashlib.sha256(f"{salt}{i}".encode()).hexdigest()[:32] for i in range(n)], dtype="str")


def records(n, salt=""):
    p = ids(n, salt)
    return pd.DataFrame(
        {
            "record_id": p,
            "prompt_id": p,
            "instruction": "问",
            "input": [f"症状{salt}{i}" for i in range(n)],
            "output": "答",
            "source_file": "f.json",
            "source_line": range(1, n + 1),
            "source_index": range(n),
        }
    )


def test_split_is_a_function_of_the_prompt_and_stable_when_rows_are_added():
    base = ids(500)
    more = pd.concat([base, ids(500, salt="new")], ignore_index=True)
    s1 = assign_split(base, 0.1)
    s2 = assign_split(more, 0.1)
    assert (s1 == s2[:500]).all()
    share = (s2 == "eval").mean()
    assert 0.05 < share < 0.15


def test_at_least_one_eval_row_from_two_rows():
    for salt in ("a", "b", "c", "d"):
        s = assign_split(ids(2, salt), 0.1)
        assert sorted(s) == ["eval", "train"]
    assert list(assign_split(ids(1), 0.1)) in (["train"], ["eval"])
    assert set(assign_split(ids(10), 0.0)) == {"train"}


def test_rows_sharing_a_prompt_share_a_split():
    p = pd.Series(["a" * 32, "b" * 32, "a" * 32, "c" * 32, "b" * 32], dtype="str")
    s = assign_split(p, 0.5)
    assert s[0] == s[2] and s[1] == s[4]


def test_parquet_is_byte_identical_for_the_same_input(tmp_path):
    df = build_alpaca(records(50))
    a = write_parquet(df, tmp_path / "a.parquet")
    b = write_parquet(build_alpaca(records(50)), tmp_path / "b.parquet")
    assert a.read_bytes() == b.read_bytes()
    meta = pq.ParquetFile(a).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert list(pd.read_parquet(a).columns) == [
        "record_id",
        "prompt_id",
        "instruction",
        "input",
        "output",
        "split",
        "source_file",
        "source_line",
    ]


def test_readable_by_datasets(tmp_path):
    import datasets

    path = write_parquet(build_alpaca(records(20)), tmp_path / "alpaca.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 20 and set(ds.unique("split")) <= {"train", "eval"}
    assert ds.features["instruction"].dtype == "string"
