"""The training child launched through a resource: a subprocess here, or a Kubernetes pod through
Dagster Pipes. The pod spec is a plain function; the asset is materialized through a fake
Kubernetes client that records what it was asked and runs the child on this machine."""

import os

import pytest
from dagster import AssetSelection, DagsterInstance, PipesSubprocessClient, materialize

from conftest import PROJECT_ROOT, demo_records, mlflow_store, model_in_data_root, write_json
from pipeline.definitions import all_assets, make_resources
from resources.pipes_reader import WholeLineTempFileMessageReader
from resources.training_launcher import POD_ENV, TrainingLauncher, pod_spec


def test_the_pod_asks_for_the_gpus_and_mounts_the_data_volume_where_the_paths_point():
    spec = pod_spec(
        "/mnt/team/medtune-data", gpus=4, volume_claim="medtune-data", service_account="trainer", memory="64Gi"
    )
    (container,) = spec["containers"]
    assert container["resources"] == {"requests": {"memory": "64Gi"}, "limits": {"nvidia.com/gpu": "4"}}
    assert container["volumeMounts"] == [{"name": "medtune-data", "mountPath": "/mnt/team/medtune-data"}]
    assert spec["volumes"] == [{"name": "medtune-data", "persistentVolumeClaim": {"claimName": "medtune-data"}}]
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == "trainer"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_only = pod_spec("/data", gpus=0)
    assert "tolerations" not in cpu_only and "volumes" not in cpu_only
    assert "resources" not in cpu_only["containers"][0]


def test_kubernetes_needs_an_image_and_says_how_to_get_the_client():
    with pytest.raises(ValueError, match="needs an image"):
        TrainingLauncher(kind="kubernetes").run(None, command=["x"], cwd=".", env={}, data_dir="/d")


class FakeK8sClient:
    """``PipesK8sClient``'s ``run``: records its arguments, then runs the command here under Pipes."""

    def __init__(self):
        self.calls: list[dict] = []

    def run(self, *, context, image, command, namespace, env, base_pod_spec):
        self.calls.append(
            {"image": image, "command": command, "namespace": namespace, "env": env, "spec": base_pod_spec}
        )
        local = PipesSubprocessClient(message_reader=WholeLineTempFileMessageReader())
        child_env = {**os.environ, **env, "PYTHONPATH": str(PROJECT_ROOT)}
        return local.run(context=context, command=command, cwd=str(PROJECT_ROOT), env=child_env)


class RecordingLauncher(TrainingLauncher):
    def k8s_client(self):
        return FAKE


FAKE = FakeK8sClient()


def test_lora_adapter_trains_through_the_kubernetes_launcher(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEDTUNE_TEST_SECRET_TOKEN", "hunter2")
    data_dir = tmp_path / "data"
    write_json(data_dir / "raw" / "demo.json", demo_records(8))
    resources = make_resources(str(data_dir), mlflow_store(tmp_path / "mlflow.db"))
    resources["training_launcher"] = RecordingLauncher(
        kind="kubernetes", image="medtune:gpu", namespace="ml", gpus=2, volume_claim="medtune-data"
    )
    result = materialize(
        all_assets,
        selection=AssetSelection.assets("lora_adapter").upstream(),
        resources=resources,
        instance=DagsterInstance.ephemeral(),
        run_config={
            "ops": {
                "base_model": {"config": {"model": model_in_data_root(tiny_model_dir, data_dir)}},
                "lora_adapter": {"config": {"max_steps": 2, "precision": "fp32", "compile": False}},
            }
        },
    )
    assert result.success
    (call,) = FAKE.calls
    assert call["image"] == "medtune:gpu" and call["namespace"] == "ml"
    assert call["command"][1:4] == ["-m", "pipeline.stages.lora_adapter", "--spec"]  # the same entry point
    assert call["command"][4].startswith(str(data_dir.resolve())) or call["command"][4].startswith(str(data_dir))
    assert call["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert call["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == str(data_dir)
    assert call["env"]["MEDTUNE_DATA_DIR"] == str(data_dir) and set(call["env"]) <= {*POD_ENV, "MEDTUNE_DATA_DIR"}
    assert "hunter2" not in repr(call)
    steps = result.asset_materializations_for_node("lora_adapter")[0].metadata["steps"].value
    assert steps == 2  # the child's report came back through Pipes
