"""Methods through the whole Dagster pipeline on the tiny model: a prompt-tuning run whose
merged_model says it cannot merge (and the run goes on), and a full fine-tuning whose export is the
trained model itself."""

import pytest
from dagster import DagsterInstance, Definitions

from conftest import demo_records, mlflow_store, model_in_data_root, write_json
from pipeline.definitions import JOBS, all_asset_checks, all_assets, make_resources
from pipeline.ops.summary import summary

pytestmark = pytest.mark.slow  # whole pipelines per method: make test, not make test-fast


def run(data_dir, tracking_uri, model_dir, **train_config):
    defs = Definitions(
        assets=all_assets,
        asset_checks=all_asset_checks,
        jobs=JOBS,
        resources=make_resources(str(data_dir), tracking_uri),
    )
    config = {
        "ops": {
            "base_model": {"config": {"model": model_in_data_root(model_dir, data_dir)}},
            "tokenized_dataset": {"config": {"max_seq_len": 256}},
            "lora_adapter": {
                "config": {
                    "max_steps": 4,
                    "eval_every": 4,
                    "precision": "fp32",
                    "log_every": 1,
                    "compile": False,
                    **train_config,
                }
            },
            "evaluation_report": {"config": {"max_new_tokens": 4, "train_sample_size": 2}},
        }
    }
    return defs.resolve_job_def("full_pipeline_job").execute_in_process(
        run_config=config, instance=DagsterInstance.ephemeral(), raise_on_error=False
    )


def meta(result, node, key):
    return result.asset_materializations_for_node(node)[0].metadata[key].value


@pytest.fixture
def data_dir(tmp_path):
    write_json(tmp_path / "data" / "raw" / "demo.json", demo_records(24))
    return tmp_path / "data"


def test_prompt_tuning_runs_through_and_merged_model_says_it_cannot_merge(data_dir, tmp_path, tiny_model_dir):
    result = run(
        data_dir,
        mlflow_store(tmp_path / "mlflow.db"),
        tiny_model_dir,
        method="prompt_tuning",
        num_virtual_tokens=4,
        learning_rate=3e-2,
    )
    assert result.asset_materializations_for_node("registered_model")  # the run went on to the end
    assert (
        meta(result, "lora_adapter", "method") == "prompt_tuning"
        and meta(result, "lora_adapter", "trainable_parameters") == 4 * 64
    )
    assert meta(result, "merged_model", "mergeable") is False
    assert "cannot be merged" in meta(result, "merged_model", "reason")
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "merged_matches_adapter"]
    assert check.passed and check.metadata["applicable"].value is False
    assert not (data_dir / "models" / "merged").exists() or not any((data_dir / "models" / "merged").iterdir())
    said = summary(str(data_dir))  # what make run prints at the end
    assert "merged model        none: " in said and "cannot be merged" in said
    assert "merged_matches_adapter" not in said  # the check does not apply


def test_the_summary_says_nothing_was_materialized_in_a_new_data_dir(tmp_path):
    assert summary(str(tmp_path / "empty")) == "nothing materialized yet: run `make run`"


def test_full_fine_tuning_exports_the_trained_model_itself(data_dir, tmp_path, tiny_model_dir):
    result = run(data_dir, mlflow_store(tmp_path / "mlflow.db"), tiny_model_dir, method="full", learning_rate=1e-3)
    assert result.success
    assert meta(result, "lora_adapter", "method") == "full" and meta(result, "lora_adapter", "optimizer") == "adafactor"
    assert (
        meta(result, "merged_model", "method") == "full" and meta(result, "merged_model", "max_abs_logit_diff") == 0.0
    )
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(meta(result, "merged_model", "path"))  # plain transformers loads it

    said = summary(str(data_dir))  # what make run prints at the end: one line per stage, figures from its record
    assert said.startswith(f"MedTune summary for {data_dir}")
    assert "rows read           24" in said and "rows kept           " in said and "rows rejected       " in said
    assert "tokenized           " in said and "training            4 steps in " in said
    assert f"adapter             {meta(result, 'lora_adapter', 'path')}" in said
    assert (
        f"merged model        {meta(result, 'merged_model', 'path')}" in said
        and "merged_matches_adapter passed" in said
    )
    assert "tuned_beats_base    " in said and "base vs tuned" in said
    assert "registered          medtune version 1 (aliases: " in said or "registered          NOT registered: " in said
