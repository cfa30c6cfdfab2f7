"""Sweeps: the grid expands into named trials; on the tiny model a sweep runs as Dagster partitions,
each trial an MLflow child run under the sweep's parent run, a failing trial recorded as failed
while the others finish, and the comparison table and plots on the parent run."""

import json

import pytest
from dagster import DagsterInstance, Definitions
from mlflow.tracking import MlflowClient

from conftest import demo_records, mlflow_store, model_in_data_root, write_json
from pipeline.definitions import JOBS, all_asset_checks, all_assets, make_resources
from pipeline.ops.sweep import run_sweep
from pipeline.stages.sweep_plan import SweepError, expand, split_key

pytestmark = pytest.mark.slow  # a sweep's partitions through Dagster: make test, not make test-fast


def test_the_grid_expands_into_labelled_trials_most_specific_setting_first():
    trials = expand(
        {"max_steps": 40, "learning_rate": 1e-3},
        {"method": ["lora", "ia3"], "r": [8, 16]},
        [{"method": "full", "learning_rate": 5e-5}, {"method": "lora", "r": 8}],  # the last repeats a grid point
        {"ia3": {"learning_rate": 1e-2}, "full": {"learning_rate": 1e-4}},
    )
    assert [t.label for t in trials] == ["lora-r8", "lora-r16", "ia3-r8", "ia3-r16", "full-lr5e-05"]
    by = {t.label: t.settings for t in trials}
    assert by["ia3-r8"]["learning_rate"] == 1e-2 and by["lora-r16"]["learning_rate"] == 1e-3
    assert by["full-lr5e-05"]["learning_rate"] == 5e-5  # the trial's own value beats per_method
    assert all(s["max_steps"] == 40 for s in by.values())
    with pytest.raises(SweepError, match="no trials"):
        expand({}, {}, [], {})
    with pytest.raises(SweepError, match="grid.r must be a non-empty list"):
        expand({}, {"r": []}, [], {})
    assert split_key("sweep-cpu.lora-r16") == ("sweep-cpu", "lora-r16")
    for label in ("../../outside", "a/b", ".hidden", ""):  # it names the trial's files: never a path
        with pytest.raises(SweepError, match="trial label"):
            expand({}, {}, [{"r": 8, "label": label or " "}], {})


@pytest.fixture
def data_dir(tmp_path):
    write_json(tmp_path / "data" / "raw" / "demo.json", demo_records(24))
    return tmp_path / "data"


def test_a_sweep_runs_as_partitions_under_one_parent_run_and_records_a_failing_trial(
    data_dir, tmp_path, tiny_model_dir
):
    uri = mlflow_store(tmp_path / "mlflow.db")
    defs = Definitions(
        assets=all_assets, asset_checks=all_asset_checks, jobs=JOBS, resources=make_resources(str(data_dir), uri)
    )
    config = {
        "ops": {
            "base_model": {"config": {"model": model_in_data_root(tiny_model_dir, data_dir)}},
            "tokenized_dataset": {"config": {"max_seq_len": 256}},
            "sweep_plan": {
                "config": {
                    "name": "tiny",
                    "base": {
                        "max_steps": 4,
                        "eval_every": 4,
                        "log_every": 1,
                        "learning_rate": 5e-3,
                        "precision": "fp32",
                        "r": 8,
                        "lora_alpha": 16,
                        "compile": False,
                    },
                    "grid": {"method": ["lora", "ia3"]},
                    "trials": [{"label": "broken", "target_modules": "no_such_layer"}],
                    "per_method": {"ia3": {"learning_rate": 3e-2}},
                    "evaluation": {"max_new_tokens": 4, "train_sample_size": 2},
                }
            },
        }
    }
    instance = DagsterInstance.ephemeral()
    out = run_sweep(defs, config, instance, log=lambda *_: None)
    assert out.trials == {"tiny.lora": True, "tiny.ia3": True, "tiny.broken": False}
    assert set(instance.get_dynamic_partitions("sweep_trials")) == {"tiny.lora", "tiny.ia3", "tiny.broken"}

    client = MlflowClient(uri)
    parent_id = out.plan.parent_run_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["medtune.best_trial"] in ("lora", "ia3")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    status = {c.data.tags["medtune.trial"]: c for c in children}
    assert sorted(status) == ["broken", "ia3", "lora"]
    assert status["broken"].info.status == "FAILED" and "no_such_layer" in status["broken"].data.tags["medtune.error"]
    for name in ("lora", "ia3"):
        run = status[name]
        assert run.info.status == "FINISHED" and run.data.params["method"] == name
        assert run.data.metrics["trainable_parameters"] > 0 and run.data.metrics["adapter_bytes"] > 0
        assert run.data.metrics["tuned_eval_loss"] < run.data.metrics["base_eval_loss"]
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4  # the loss curve, step by step
    assert {a.path for a in client.list_artifacts(parent_id, "comparison")} == {
        "comparison/comparison.csv",
        "comparison/comparison.md",
        "comparison/comparison.png",
    }

    comparison = out.comparison
    assert comparison.counts == {"finished": 2, "failed": 1}
    from pathlib import Path

    import pandas as pd

    table = pd.read_csv(Path(comparison.path) / "comparison.csv")
    assert list(table["trial"]) == ["lora", "ia3", "broken"]
    broken = table[table["trial"] == "broken"].iloc[0]
    assert broken["status"] == "failed" and "no_such_layer" in broken["error"]
    done = table[table["status"] == "finished"]
    assert (done["eval_loss"] < done["base_eval_loss"]).all() and (done["trainable_parameters"] > 0).all()
    assert done["train_seconds"].notna().all() and done["peak_rss_mb"].notna().all()
    record = json.loads((data_dir / "sweeps" / "tiny" / "trials" / "lora.json").read_text())
    assert record["status"] == "finished" and record["settings"]["method"] == "lora"

    # the same sweep again: same parent run, every finished trial's adapter reused
    adapters = sorted(p.name for p in (data_dir / "models" / "adapters").iterdir())
    again = run_sweep(defs, config, instance, log=lambda *_: None)
    assert again.plan.parent_run_id == parent_id
    assert sorted(p.name for p in (data_dir / "models" / "adapters").iterdir()) == adapters
    assert again.trials["tiny.lora"] and not again.trials["tiny.broken"]
