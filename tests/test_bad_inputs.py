"""The hostile-input corpus (tests/fixtures/bad_inputs/): for every case no exception, rows read =
rows kept + rows rejected, the valid rows beside the bad ones kept, and the reasons named.

``expected.json`` holds, per file, the rows read and kept after ingest + validation + dedup and
the stage and reason of each rejected row (a prefix). The big cases (a 50 MB answer, a million
rows, a symlink out of the raw folder) are generated at test time by ``_generate.py``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterEventType, DagsterInstance, Definitions

from conftest import model_in_data_root, write_json
from pipeline.stages.deduplicated_records import deduplicate
from pipeline.stages.raw_records import ingest
from pipeline.stages.validated_records import validate_records

CORPUS = Path(__file__).parent / "fixtures" / "bad_inputs"
EXPECTED = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
CASES = sorted(p.name for p in CORPUS.iterdir() if not p.name.startswith("_") and p.name != "expected.json")


def _generator():
    spec = importlib.util.spec_from_file_location("bad_inputs_generate", CORPUS / "_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
COMPANION = [GEN.good("companion", k) for k in range(3)]


def run_stages(raw: Path):
    ing = ingest(raw)
    val = validate_records(ing.kept)
    dd = deduplicate(val.kept)
    rejected = pd.concat([ing.rejected, val.rejected, dd.rejected], ignore_index=True)
    return ing, dd.kept, rejected


def check_case(name: str, expected: dict, kept: pd.DataFrame, rejected: pd.DataFrame, ing_files: list[dict]) -> None:
    mine_kept = kept[kept.source_file == name]
    mine_rej = rejected[rejected.source_file == name]
    summary = [f for f in ing_files if f["source_file"] == name]
    read = summary[0]["rows_read"] if summary else 0
    assert read == expected["read"], (name, read)
    assert read == len(mine_kept) + len(mine_rej), name  # every row read is kept or rejected
    assert len(mine_kept) == expected["kept"], (name, mine_rej[["stage", "reason"]].values.tolist())
    got = [f"{r.stage}:{r.reason}" for r in mine_rej.itertuples()]
    assert len(got) == len(expected["reasons"]), (name, got)
    for want in expected["reasons"]:
        assert any(g.startswith(want) for g in got), (name, want, got)
    for r in mine_rej.itertuples():
        assert r.stage in ("ingest", "validate", "dedup") and r.reason
        assert pd.notna(r.source_line) or r.reason.startswith("file rejected:"), (name, r.reason)


def test_the_corpus_is_what_the_generator_writes_and_has_at_least_40_cases():
    written = GEN.cases()
    assert sorted(written) == CASES
    for name, data in written.items():
        assert (CORPUS / name).read_bytes() == data, f"{name} differs from _generate.py: run it again"
    assert sorted(EXPECTED) == CASES
    assert len(CASES) + 4 >= 40  # plus the generated ones: 50 MB answer, million rows, two symlinks


@pytest.mark.parametrize("name", CASES)
def test_each_case_keeps_its_valid_rows_and_accounts_for_every_row(tmp_path, name):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(CORPUS / name, raw / name)
    write_json(raw / "companion.json", COMPANION)
    ing, kept, rejected = run_stages(raw)  # no exception for any input problem
    assert ing.stats["rows_read"] == len(kept) + len(rejected)
    assert len(kept[kept.source_file == "companion.json"]) == 3  # the good file beside it is untouched
    check_case(name, EXPECTED[name], kept, rejected, ing.stats["files"])


@pytest.mark.slow
def test_a_50_mb_answer_a_million_rows_and_symlinks_out_of_the_raw_folder(tmp_path):
    raw = tmp_path / "raw"
    expected = GEN.generate_large_cases(raw, tmp_path / "outside")
    write_json(raw / "companion.json", COMPANION)
    ing, kept, rejected = run_stages(raw)
    assert ing.stats["rows_read"] == len(kept) + len(rejected) == 1_000_000 + 3 + 1 + 1 + 3
    for name, want in expected.items():
        check_case(name, want, kept, rejected, ing.stats["files"])
    assert "outside" not in set(kept["input"].str.slice(0, 20))  # nothing read through the links
    big = rejected[rejected.source_file == "answer_of_50_mb.json"]
    assert len(big.raw.item()) < 1_100_000  # the rejected row's text is clipped, not 50 MB


def test_the_whole_corpus_through_dagster_completes_and_accounts_for_every_row(tmp_path, tiny_model_dir):
    from pipeline.definitions import JOBS, all_asset_checks, all_assets, make_resources

    data = tmp_path / "data"
    raw = data / "raw"
    shutil.copytree(CORPUS, raw, ignore=shutil.ignore_patterns("_*", "expected.json"))
    defs = Definitions(
        assets=all_assets,
        asset_checks=all_asset_checks,
        jobs=JOBS,
        resources=make_resources(str(data), f"sqlite:///{tmp_path}/mlflow.db"),
    )
    job = defs.resolve_job_def("prepare_data_job")
    config = {
        "ops": {
            "base_model": {"config": {"model": model_in_data_root(tiny_model_dir, data)}},
            "validated_records": {"config": {"max_reject_ratio": 0.9}},
        }
    }
    result = job.execute_in_process(run_config=config, instance=DagsterInstance.ephemeral(), raise_on_error=False)
    failures = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert result.success and not failures, [f.event_specific_data.error.message for f in failures]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks.values()), checks
    alpaca = pd.read_parquet(data / "processed" / "alpaca.parquet")
    rejected = pd.read_parquet(data / "processed" / "rejected.parquet")
    rows_read = result.asset_materializations_for_node("raw_records")[0].metadata["rows_read"].value
    assert rows_read == sum(e["read"] for e in EXPECTED.values())
    assert len(alpaca) == sum(e["kept"] for e in EXPECTED.values())
    assert len(alpaca) + len(rejected) == rows_read
