"""The data half materialized in-process by Dagster on a temporary data dir, with the tiny model."""

import pandas as pd
import pytest
from dagster import DagsterInstance, Definitions

from conftest import INSTR, demo_records, model_in_data_root, rec, write_json, write_jsonl
from pipeline.definitions import JOBS, all_asset_checks, all_assets, make_resources

pytestmark = pytest.mark.slow  # whole data pipelines through Dagster: make test, not make test-fast

DATA_ASSETS = [
    "raw_records",
    "validated_records",
    "deduplicated_records",
    "rejected_records",
    "alpaca_dataset",
    "base_model",
    "tokenized_dataset",
]


def run(data_dir, model_dir, extra_config=None):
    defs = Definitions(
        assets=all_assets,
        asset_checks=all_asset_checks,
        jobs=JOBS,
        resources=make_resources(str(data_dir), f"sqlite:///{data_dir}/mlflow.db"),
    )
    job = defs.resolve_job_def("prepare_data_job")
    config = {
        "ops": {"base_model": {"config": {"model": model_in_data_root(model_dir, data_dir)}}, **(extra_config or {})}
    }
    return job.execute_in_process(run_config=config, instance=DagsterInstance.ephemeral(), raise_on_error=False)


def meta(result, asset, key):
    return result.asset_materializations_for_node(asset)[0].metadata[key].value


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    raw = d / "raw"
    clean = demo_records(30)
    write_json(raw / "clean.json", clean)
    write_json(
        raw / "more" / "dirty.json",
        [
            clean[0],  # exact duplicate
            {**clean[1], "input": "  " + clean[1]["input"] + "\n"},  # whitespace variant
            rec(clean[2]["input"], "另一个答案"),  # conflict with clean[2]
            rec("头痛", ""),  # empty answer
            {"instruction": INSTR, "input": 7, "output": "x"},  # number
        ],
        encoding="utf-8-sig",
    )
    write_jsonl(raw / "more" / "lines.jsonl", [rec("失眠", "归脾丸"), "", "{broken", rec("便秘", "麻仁润肠丸")])
    write_json(raw / "gb.json", [rec("腰膝酸软", "六味地黄丸")], encoding="gb18030")
    (raw / "garbage.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\xfd")
    return d


def test_materializes_every_data_asset_and_accounts_for_every_row(data_dir, tiny_model_dir):
    result = run(data_dir, tiny_model_dir)
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == set(DATA_ASSETS)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "reject_ratio_within_limit": True,
        "every_row_accounted_for": True,
        "no_prompt_in_both_splits": True,
        "no_near_twin_across_splits": True,
    }

    alpaca = pd.read_parquet(data_dir / "processed" / "alpaca.parquet")
    rejected = pd.read_parquet(data_dir / "processed" / "rejected.parquet")
    rows_read = meta(result, "raw_records", "rows_read")
    assert rows_read == 30 + 5 + 3 + 1 + 1
    assert len(alpaca) + len(rejected) == rows_read
    assert len(alpaca) == 30 + 2 + 1
    assert list(alpaca.columns) == [
        "record_id",
        "prompt_id",
        "instruction",
        "input",
        "output",
        "split",
        "source_file",
        "source_line",
    ]
    from pipeline.ops.summary import summary  # what make run prints, from the latest run's descriptors

    said = summary(str(data_dir))
    assert f"rows read           {rows_read}" in said and f"rows kept           {len(alpaca)}" in said, said
    assert alpaca["record_id"].is_unique
    assert set(alpaca["split"]) == {"train", "eval"}
    assert not set(alpaca.loc[alpaca.split == "train", "prompt_id"]) & set(
        alpaca.loc[alpaca.split == "eval", "prompt_id"]
    )

    by = {(r.source_file, r.source_line): (r.stage, r.reason) for r in rejected.itertuples()}
    assert rejected.loc[rejected.source_file == "garbage.json", "reason"].item().startswith("file rejected:")
    assert by[("more/dirty.json", 2)][0] == "dedup" and by[("more/dirty.json", 2)][1].startswith(
        "duplicate of clean.json:2"
    )
    assert by[("more/dirty.json", 7)][0] == "dedup"  # whitespace variant
    assert by[("more/dirty.json", 12)][1].startswith("conflict:")
    assert by[("more/dirty.json", 17)] == (
        "validate",
        "output: not blank after trimming [expect_column_values_to_match_regex]; "
        "output: length between 1 and 16000 characters [expect_column_value_lengths_to_be_between]",
    )
    assert by[("more/dirty.json", 22)] == ("ingest", "field 'input' is a number, expected a string")
    assert by[("more/lines.jsonl", 3)][0] == "ingest" and by[("more/lines.jsonl", 3)][1].startswith("invalid JSON")
    assert set(rejected.columns) == {"source_file", "source_line", "source_index", "stage", "reason", "raw"}

    tok_path = meta(result, "tokenized_dataset", "path")
    train = pd.read_parquet(f"{tok_path}/train.parquet")
    assert len(train) == meta(result, "tokenized_dataset", "train_rows") > 0
    assert meta(result, "tokenized_dataset", "cache_hit") is False
    for key in ("rows_read", "rows_kept", "rows_rejected", "preview", "files"):
        assert key in result.asset_materializations_for_node("raw_records")[0].metadata
    assert "expect_column_values_to_not_be_null" in meta(result, "validated_records", "expectations")

    # a second run with the same input gives byte-identical files and reuses the tokenized cache
    first = {p: (data_dir / "processed" / p).read_bytes() for p in ("alpaca.parquet", "rejected.parquet")}
    again = run(data_dir, tiny_model_dir)
    assert again.success
    assert {p: (data_dir / "processed" / p).read_bytes() for p in first} == first
    assert meta(again, "tokenized_dataset", "cache_hit") is True

    # alpaca_dataset hands on a typed value; its descriptor, and an older plain one, decode to it
    from pipeline.stages.alpaca_dataset import AlpacaDataset
    from resources.stage_io import decode

    value = again.output_for_node("alpaca_dataset")
    assert isinstance(value, AlpacaDataset) and value.rows == len(alpaca) and value.train + value.eval == value.rows
    import json

    written = json.loads((data_dir / "processed" / "stages" / "alpaca_dataset.json").read_text())
    assert decode(written) == value
    plain = {k: v for k, v in written.items() if not k.startswith("__")} | {"a_key_it_no_longer_has": 1}
    assert decode(plain, AlpacaDataset) == value and decode(plain) == plain


def test_blocking_check_stops_the_run_when_too_much_is_rejected(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    write_json(
        data / "raw" / "bad.json",
        [rec("a", "b")] + [{"instruction": INSTR, "input": i, "output": "x"} for i in range(5)],
    )
    result = run(data, tiny_model_dir)
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["reject_ratio_within_limit"].passed is False
    assert "over max_reject_ratio" in checks["reject_ratio_within_limit"].description
    assert not (data / "processed" / "alpaca.parquet").exists()
    # the same data passes with a looser limit
    loose = run(data, tiny_model_dir, {"validated_records": {"config": {"max_reject_ratio": 0.9}}})
    assert loose.success


def test_definitions_load_every_asset():
    from pipeline.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert set(DATA_ASSETS) <= keys
    graph = defs.resolve_asset_graph()
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups["base_model"] == "model"
    assert all(groups[a] == "data" for a in DATA_ASSETS if a != "base_model")
