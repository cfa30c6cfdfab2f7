"""Safe defaults: config paths stay inside the data root, model code and pickles are never run
unless asked, secrets never reach what MedTune records."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from assets.base_model import base_model
from pipeline.core.secrets import MASK, redact, redact_params
from pipeline.stages.base_model import ModelSourceError, check_adapter_folder, resolve_base_model
from resources.data_root import DataRoot, PathOutsideDataRoot


@pytest.fixture
def root(tmp_path):
    (tmp_path / "data" / "models").mkdir(parents=True)
    return DataRoot(path=str(tmp_path / "data"))


def test_config_paths_are_resolved_inside_the_data_root(root, tmp_path):
    inside = Path(root.path) / "models" / "m"
    inside.mkdir()
    assert root.confine("models/m", "x") == inside.resolve()
    assert root.confine(str(inside), "x") == inside.resolve()
    with pytest.raises(PathOutsideDataRoot, match=r"x: '\.\./elsewhere' is outside the data root"):
        root.confine("../elsewhere", "x")
    with pytest.raises(PathOutsideDataRoot, match="allow_outside_paths"):
        root.confine(str(tmp_path), "x")
    (Path(root.path) / "models" / "link").symlink_to(tmp_path)
    with pytest.raises(PathOutsideDataRoot, match="a symlink: it resolves to"):
        root.confine("models/link", "x")
    assert root.confine(str(tmp_path), "x", allow_outside=True) == tmp_path.resolve()


def run_base_model(root: DataRoot, model: str, **config):
    return materialize(
        [base_model],
        resources={"data_root": root},
        instance=DagsterInstance.ephemeral(),
        run_config={"ops": {"base_model": {"config": {"model": model, **config}}}},
        raise_on_error=False,
    )


def test_base_model_outside_the_data_root_is_refused_unless_allowed(root, tiny_model_dir):
    refused = run_base_model(root, str(tiny_model_dir))
    assert not refused.success
    failure = next(e for e in refused.all_events if e.is_step_failure)
    assert "base_model.model" in str(failure.event_specific_data.error)
    assert "is outside the data root" in str(failure.event_specific_data.error)
    link = Path(root.path) / "models" / "tiny"
    link.symlink_to(tiny_model_dir)  # a symlink inside that points out is refused too
    assert not run_base_model(root, "models/tiny").success
    allowed = run_base_model(root, str(tiny_model_dir), allow_outside_paths=True)
    assert allowed.success
    link.unlink()
    shutil.copytree(tiny_model_dir, link)
    inside = run_base_model(root, "models/tiny")  # relative to the data root
    assert inside.success
    assert inside.asset_materializations_for_node("base_model")[0].metadata["trust_remote_code"].value is False


def test_a_model_that_needs_its_own_code_is_refused_unless_trusted(tmp_path, tiny_model_dir):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="trust_remote_code: true"):
        resolve_base_model(str(folder), tmp_path / "models")
    assert resolve_base_model(str(folder), tmp_path / "models", trust_remote_code=True).trust_remote_code is True


class Tripwire:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_weights_are_never_loaded(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.lora_adapter.generation import load_tuned_model

    folder = tmp_path / "with-pickle"
    shutil.copytree(tiny_model_dir, folder)
    tripped = tmp_path / "TRIPPED"
    for name in ("pytorch_model.bin", "adapter_model.bin"):
        (folder / name).write_bytes(pickle.dumps(Tripwire(str(tripped))))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    shutil.copy(folder / "adapter_model.bin", adapter / "adapter_model.bin")  # beside the safetensors
    load_tuned_model(str(folder), str(adapter))
    assert not tripped.exists()  # neither the base's nor the adapter's pickle was opened

    pickle_only = tmp_path / "pickle-only-adapter"
    pickle_only.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickle_only)
    shutil.copy(adapter / "adapter_model.bin", pickle_only)
    with pytest.raises(ModelSourceError, match="no adapter_model.safetensors .only adapter_model.bin"):
        check_adapter_folder(pickle_only)
    with pytest.raises(ModelSourceError, match="no adapter_model.safetensors"):
        load_tuned_model(str(folder), str(pickle_only))
    assert not tripped.exists()


def test_secrets_are_redacted(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "not-a-real-token-but-secret")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-and-more")
    assert redact("https://alice:s3cr3t@mlflow.example.org/api") == f"https://alice:{MASK}@mlflow.example.org/api"
    assert redact("token hf_" + "a" * 34 + " and sk-" + "b" * 40) == f"token {MASK} and {MASK}"
    assert (
        redact("error: bad credentials not-a-real-token-but-secret / hunter2-and-more")
        == f"error: bad credentials {MASK} / {MASK}"
    )
    params = redact_params(
        {
            "hf_token": "abc",
            "api_key": "k",
            "max_new_tokens": 256,
            "tokenizer_fingerprint": "f0",
            "uri": "http://u:p@h:5000",
            "nested": {"password": "x"},
            "access_token": None,
        }
    )
    assert params == {
        "hf_token": MASK,
        "api_key": MASK,
        "max_new_tokens": 256,
        "tokenizer_fingerprint": "f0",
        "uri": f"http://u:{MASK}@h:5000",
        "nested": {"password": MASK},
        "access_token": None,
    }


def test_no_config_field_takes_a_secret():
    """Tokens come from the environment only: no asset's Config or resource has a field for one."""
    from dagster import Config, ConfigurableResource

    import pipeline.definitions  # noqa: F401  (imports every asset module)
    from pipeline.core.secrets import SECRET_NAME
    from pipeline.definitions import make_resources

    configs = [c for c in Config.__subclasses__() if c.__module__.startswith("assets.")]
    fields = [(c.__name__, f) for c in configs for f in c.model_fields]
    fields += [
        (name, f)
        for name, r in make_resources("/tmp/x").items()
        if isinstance(r, ConfigurableResource)
        for f in type(r).model_fields
    ]
    assert len(configs) >= 8 and len(fields) > 50  # the walk found the settings
    assert [(a, f) for a, f in fields if SECRET_NAME.search(f)] == []


@pytest.mark.slow
def test_hf_token_is_never_recorded(monkeypatch, tmp_path, tiny_model_dir):
    """A whole pipeline run with secrets in the environment: none reaches MLflow or Dagster metadata."""
    from mlflow.tracking import MlflowClient
    from test_faults import run_pipeline

    from conftest import demo_records, mlflow_store, write_json

    secret, password = "hf_" + "Z" * 36, "tracking-pass-1234"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    data = tmp_path / "data"
    write_json(data / "raw" / "demo.json", demo_records(24))
    uri = mlflow_store(tmp_path / "mlflow.db")
    result = run_pipeline(data, uri, tiny_model_dir)
    assert result.success
    recorded = [str(e.event_specific_data) for e in result.all_events if e.event_specific_data is not None]
    client = MlflowClient(uri, registry_uri=uri)
    for exp in client.search_experiments():
        for run in client.search_runs(exp.experiment_id):
            recorded += [json.dumps(run.data.params), json.dumps(run.data.tags)]
            local = client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl" / run.info.run_id))
            for p in Path(local).rglob("*"):
                if p.is_file() and p.suffix in (".json", ".jsonl", ".csv", ".txt", ".yaml", ".md", ""):
                    recorded.append(p.read_text(errors="replace"))
    for mv in client.search_model_versions("name = 'medtune'"):
        recorded.append(json.dumps(mv.tags))
    for p in data.rglob("*.json"):
        recorded.append(p.read_text(errors="replace"))
    blob = "\n".join(recorded)
    assert len(blob) > 10_000  # params, tags, records and artifacts were all read
    assert secret not in blob and password not in blob
    assert os.environ["HF_TOKEN"] == secret  # (the child got the environment it needs)


def test_a_password_in_a_url_in_the_environment_is_masked_everywhere(monkeypatch):
    """MEDTUNE_POSTGRES_URL's password, as written and decoded, and PGPASSWORD's value are masked in
    any text MedTune records or prints; a link to a tracking server never carries user-info."""
    from pipeline.core.secrets import redact
    from resources.mlflow_tracking import MlflowTracking, without_userinfo

    monkeypatch.setenv("MEDTUNE_POSTGRES_URL", "postgresql://medtune:p%40ss%27word9@db.example:5432/medtune")
    monkeypatch.setenv("PGPASSWORD", "p@ss'word9")
    text = (
        "connect failed for p@ss'word9 (p%40ss%27word9) at postgresql://medtune:p%40ss%27word9@db.example:5432/medtune"
    )
    assert "word9" not in redact(text)
    assert without_userinfo("https://u:p%40w@mlflow.example:8443/base") == (
        "https://mlflow.example:8443/base",
        "Basic dTpwQHc=",
    )
    link = MlflowTracking(tracking_uri="https://u:pw123456@mlflow.example/").run_link("r1", "7")
    assert link == "https://mlflow.example/#/experiments/7/runs/r1"


def test_redaction_reads_the_environment_while_another_thread_changes_it(monkeypatch):
    """MLflow's telemetry sets and removes a variable from its own thread; a plain iteration over
    os.environ then fails with a KeyError in whatever logs a secret-checked line."""
    import threading
    import time

    monkeypatch.setenv("MEDTUNE_TEST_TOKEN", "s3cret-value")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["_MEDTUNE_CHURN"] = "1"
            os.environ.pop("_MEDTUNE_CHURN", None)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert redact("key s3cret-value") == f"key {MASK}"
    finally:
        stop.set()
        worker.join()
