"""The lora_adapter asset in a real (in-process) Dagster run: Pipes child, MLflow run, resume, cache."""

import json
import socket
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, Definitions
from mlflow.tracking import MlflowClient

from conftest import demo_records, mlflow_store, model_in_data_root, rec, write_json
from pipeline.definitions import JOBS, all_asset_checks, all_assets, make_resources

pytestmark = pytest.mark.slow  # training children through Dagster Pipes: make test, not make test-fast


def run(data_dir, tracking_uri, model_dir, **train_config):
    defs = Definitions(
        assets=all_assets,
        asset_checks=all_asset_checks,
        jobs=JOBS,
        resources=make_resources(str(data_dir), tracking_uri),
    )
    job = defs.resolve_job_def("full_pipeline_job")
    config = {
        "ops": {
            "base_model": {"config": {"model": model_in_data_root(model_dir, data_dir)}},
            "tokenized_dataset": {"config": {"max_seq_len": 256}},
            "lora_adapter": {
                "config": {
                    "max_steps": 6,
                    "save_every": 2,
                    "eval_every": 3,
                    "learning_rate": 5e-3,
                    "precision": "fp32",
                    "log_every": 1,
                    "r": 16,
                    "lora_alpha": 32,
                    # ~4 s a training child; the default (on for CPU) runs in test_train_track_resume_and_cache
                    "compile": False,
                    **train_config,
                }
            },
        }
    }
    return job.execute_in_process(run_config=config, instance=DagsterInstance.ephemeral(), raise_on_error=False)


def meta(result, key, node="lora_adapter"):
    return result.asset_materializations_for_node(node)[0].metadata[key].value


def check(result, name):
    (evaluation,) = [c for c in result.get_asset_check_evaluations() if c.check_name == name]
    return evaluation


@pytest.fixture
def data_dir(tmp_path):
    write_json(tmp_path / "data" / "raw" / "demo.json", demo_records(24))
    return tmp_path / "data"


def test_train_track_resume_and_cache(data_dir, tmp_path, tiny_model_dir, monkeypatch):
    import sys

    import assets.lora_adapter as asset_module

    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    launch = asset_module.launch_command
    killed_child = Path(__file__).parent / "fixtures" / "killed_child.py"
    # the child SIGKILLed as its step 3 ends: the asset's own launch, with the test's step hook
    monkeypatch.setattr(
        asset_module,
        "launch_command",
        lambda path, config, **kw: [sys.executable, str(killed_child), "3", "--spec", str(path)],
    )
    killed = run(data_dir, uri, tiny_model_dir, compile=None)
    monkeypatch.setattr(asset_module, "launch_command", launch)
    assert not killed.success
    (failed_run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert failed_run.info.status == "FAILED" and "medtune.error" in failed_run.data.tags
    assert not list((data_dir / "models" / "adapters").glob("*"))

    resumed = run(data_dir, uri, tiny_model_dir, compile=None)
    assert resumed.success
    assert meta(resumed, "resumed_from") == "step-2" and meta(resumed, "cache_hit") is False
    run_id = meta(resumed, "mlflow_run_id")
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert (
        r.data.params["r"] == "16"
        and r.data.params["lora_alpha"] == "32"
        and r.data.params["target_modules"] == "all-linear"
    )
    assert r.data.params["learning_rate"] == "0.005"
    for tag in (
        "dagster.run_id",
        "dagster.asset_key",
        "medtune.data_fingerprint",
        "medtune.base_model_fingerprint",
        "git.commit",
    ):
        assert tag in r.data.tags
    losses = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in losses][-1] == 6 and len(losses) >= 3  # steps 3..6 after the resume
    assert len(client.get_metric_history(run_id, "eval_loss")) >= 1
    assert client.get_metric_history(run_id, "tokens_per_s")
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "adapter")
    }
    assert {"plots", "adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    assert "loss_curve" in resumed.asset_materializations_for_node("lora_adapter")[0].metadata

    # evaluation, export and registry, after the training
    assert check(resumed, "tuned_beats_base").passed, check(resumed, "tuned_beats_base").description
    assert meta(resumed, "tuned_eval_loss", "evaluation_report") < meta(resumed, "base_eval_loss", "evaluation_report")
    assert "| eval | tuned |" in meta(resumed, "summary", "evaluation_report")
    assert check(resumed, "merged_matches_adapter").passed
    assert meta(resumed, "max_abs_logit_diff", "merged_model") < 1e-4
    assert meta(resumed, "registered", "registered_model") is True
    assert meta(resumed, "aliases", "registered_model") == "challenger, champion"
    r = client.get_run(run_id)
    assert r.data.metrics["tuned_eval_loss"] < r.data.metrics["base_eval_loss"]
    assert "base_train_sample_rouge_l" in r.data.metrics and "tuned_eval_bleu_4" in r.data.metrics
    evaluation = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/evaluation.csv", "evaluation/evaluation.json", "evaluation/rows.json"} <= evaluation
    table = json.loads(Path(client.download_artifacts(run_id, "evaluation/rows.json", str(tmp_path))).read_text())
    rows = pd.DataFrame(table["data"], columns=table["columns"])  # log_table's layout
    assert {"question", "reference_medicine", "base_answer", "tuned_answer", "tuned_right", "tuned_rouge_l"} <= set(
        rows.columns
    )
    assert len(rows) == meta(resumed, "rows", "evaluation_report")
    # the data it trained on: the tokenized splits as dataset inputs, digest the data's key
    inputs = {d.dataset.name: d.dataset for d in r.inputs.dataset_inputs}
    assert set(inputs) == {"medtune-train", "medtune-eval"}
    assert inputs["medtune-train"].digest == r.data.tags["medtune.data_fingerprint"][:16]
    version = client.get_model_version_by_alias("medtune", "champion")
    assert (
        version.run_id == run_id and version.tags["medtune.data_fingerprint"] == r.data.tags["medtune.data_fingerprint"]
    )
    assert version.tags["medtune.data"].startswith("training: medtune-train (digest ")

    again = run(data_dir, uri, tiny_model_dir, compile=None)
    assert again.success and meta(again, "cache_hit") is True
    assert meta(again, "mlflow_run_id") == run_id
    assert len(client.search_runs(r.info.experiment_id)) == 2  # the failed one and the finished one, no third
    assert meta(again, "cache_hit", "evaluation_report") is True and meta(again, "cache_hit", "merged_model") is True
    assert meta(again, "version", "registered_model") == version.version or str(
        meta(again, "version", "registered_model")
    ) == str(version.version)
    assert len(client.search_model_versions("name = 'medtune'")) == 1  # nothing registered twice

    # the same data folder under another MLflow store (a team's new one): the cached adapter is not
    # trained again; its run is copied there whole, evaluated, registered; a second time reuses the copy
    uri2 = f"sqlite:///{tmp_path / 'team.db'}"
    moved = run(data_dir, uri2, tiny_model_dir, compile=None)
    assert moved.success and meta(moved, "cache_hit") is True and meta(moved, "cache_hit", "evaluation_report") is True
    team = MlflowClient(uri2, registry_uri=uri2)
    copy_id = meta(moved, "mlflow_run_id")
    copy = team.get_run(copy_id)
    assert copy_id != run_id and copy.data.tags["medtune.copied_from_run"] == run_id and copy.info.status == "FINISHED"
    assert copy.data.params == client.get_run(run_id).data.params
    assert [m.value for m in team.get_metric_history(copy_id, "train_loss")] == [m.value for m in losses]
    assert copy.data.metrics["tuned_eval_loss"] == r.data.metrics["tuned_eval_loss"]
    assert "adapter/adapter_model.safetensors" in {a.path for a in team.list_artifacts(copy_id, "adapter")}
    assert team.get_model_version_by_alias("medtune", "champion").run_id == copy_id
    assert meta(run(data_dir, uri2, tiny_model_dir, compile=None), "mlflow_run_id") == copy_id
    assert len(team.search_runs([copy.info.experiment_id])) == 1


def test_a_failed_gate_registers_nothing_and_says_why(data_dir, tmp_path, tiny_model_dir):
    uri = mlflow_store(tmp_path / "mlflow.db")
    # learning rate 0: the adapter stays at zero, the tuned model equals the base model
    result = run(data_dir, uri, tiny_model_dir, learning_rate=0.0, max_steps=2)
    assert result.success  # the pipeline worked; the model just did not qualify
    gate = check(result, "tuned_beats_base")
    assert not gate.passed and "eval loss did not go down" in gate.description
    assert meta(result, "registered", "registered_model") is False
    assert "tuned_beats_base failed" in meta(result, "reason", "registered_model")
    client = MlflowClient(uri, registry_uri=uri)
    assert client.search_registered_models() == []
    run_id = meta(result, "mlflow_run_id")
    assert client.get_run(run_id).data.tags["medtune.registration"].startswith("skipped: tuned_beats_base failed")


def test_unreachable_tracking_server_fails_before_training(data_dir, tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    password = "s3cret'Pa55"  # a quote, as a shell would choke on
    uri = f"http://medtune:{password}@127.0.0.1:{port}"  # user-info: the server's basic auth
    result = run(data_dir, uri, tiny_model_dir)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == "lora_adapter")
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in str(failure.event_specific_data.error)
    assert not [
        str(e) for e in result.all_events if password in str(e)
    ]  # messages, metadata, errors: the whole event log
    assert not (data_dir / "models" / "checkpoints").exists() or not list(
        (data_dir / "models" / "checkpoints").glob("*/step-*")
    )


def test_training_takes_the_row_length_from_the_tokenized_dataset(tmp_path, tiny_model_dir):
    """max_seq_len is tokenized_dataset's setting alone: set longer than training's old default
    (2048), the training trains the whole rows, end-of-turn label included."""
    import json

    import pandas as pd
    from dagster import AssetSelection, materialize

    long_answer = (
        "板蓝根颗粒可能适合治疗您的病症。以下是板蓝根颗粒的详细说明书：" + "【功能主治】清热解毒，凉血利咽。" * 90
    )
    records = demo_records(6) + [rec(f"长病例{i}：咽喉肿痛，口干。", long_answer) for i in range(4)]
    write_json(tmp_path / "data" / "raw" / "demo.json", records)
    data_dir = tmp_path / "data"
    uri = mlflow_store(tmp_path / "mlflow.db")
    result = materialize(
        all_assets,
        selection=AssetSelection.assets("lora_adapter").upstream(),
        resources=make_resources(str(data_dir), uri),
        instance=DagsterInstance.ephemeral(),
        run_config={
            "ops": {
                "base_model": {"config": {"model": model_in_data_root(tiny_model_dir, data_dir)}},
                "tokenized_dataset": {"config": {"max_seq_len": 3500}},
                "lora_adapter": {"config": {"precision": "fp32", "opening_repeats": 0, "epochs": 1, "compile": False}},
            }
        },
    )
    assert result.success
    tokenized = Path(result.asset_materializations_for_node("tokenized_dataset")[0].metadata["path"].value)
    manifest = json.loads((tokenized / "manifest.json").read_text())
    train = pd.read_parquet(tokenized / "train.parquet")
    assert train["length"].max() > 2048 and not train["truncated"].any()
    assert all(labels[-1] == manifest["end_of_turn_id"] for labels in train["labels"])
    done = json.loads((Path(meta(result, "path")) / "medtune_training.json").read_text())
    assert done["spec"]["max_seq_len"] == 3500
    assert done["result"]["trained_tokens"] == int(train["length"].sum())  # every train row whole, once
