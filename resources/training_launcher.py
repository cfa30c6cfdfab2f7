"""Where the training child runs: a subprocess on this machine (default), or a pod on Kubernetes
through Dagster Pipes (``dagster-k8s``'s ``PipesK8sClient``; ``pip install -e '.[k8s]'``).

Either way the child is the same command (``python -m pipeline.stages.lora_adapter --spec ...``, or
``torchrun`` / ``accelerate launch`` around it) and reports through Dagster Pipes, so the asset's
progress, metrics and result are the same. On Kubernetes the pod mounts the team's data volume at
``MEDTUNE_DATA_DIR`` (the spec, the tokenized data, the base model, the checkpoints and the adapter
are all under it, at the same paths as here) and requests ``gpus`` GPUs; its image must hold this
project and its dependencies (docs/scale-out.md has a worked example).
"""

from __future__ import annotations

from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

VOLUME = "medtune-data"
CONTAINER = "medtune-training"


def pod_spec(
    data_dir: str,
    *,
    gpus: int = 1,
    volume_claim: str | None = None,
    service_account: str | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    node_selector: dict[str, str] | None = None,
) -> dict:
    """The pod's base spec for ``PipesK8sClient``: one container that requests ``gpus`` GPUs (and
    ``cpu``/``memory`` where given), the data volume (``volume_claim``) mounted at ``data_dir``, never
    restarted (a failed training is the run's failure; the next run resumes from its checkpoint)."""
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    container: dict = {"name": CONTAINER}
    if resources := {k: v for k, v in (("requests", requests), ("limits", limits)) if v}:
        container["resources"] = resources
    spec: dict = {"restartPolicy": "Never", "containers": [container]}
    if volume_claim:
        container["volumeMounts"] = [{"name": VOLUME, "mountPath": data_dir}]
        spec["volumes"] = [{"name": VOLUME, "persistentVolumeClaim": {"claimName": volume_claim}}]
    if service_account:
        spec["serviceAccountName"] = service_account
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if gpus:  # GPU nodes are usually tainted so that only GPU work lands there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


class TrainingLauncher(ConfigurableResource):
    """Runs the training child: ``local`` (a subprocess here) or ``kubernetes`` (a pod)."""

    kind: Literal["local", "kubernetes"] = Field("local", description="Where the training child runs")
    image: str | None = Field(None, description="kubernetes: the image holding this project and its dependencies")
    namespace: str = Field("default", description="kubernetes: the namespace of the training pods")
    gpus: int = Field(1, ge=0, description="kubernetes: GPUs the pod requests (nvidia.com/gpu)")
    volume_claim: str | None = Field(
        None, description="kubernetes: the PersistentVolumeClaim mounted at MEDTUNE_DATA_DIR (the team's data volume)"
    )
    service_account: str | None = Field(None, description="kubernetes: the pod's service account")
    cpu: str | None = Field(None, description="kubernetes: CPU the pod requests (e.g. 8)")
    memory: str | None = Field(None, description="kubernetes: memory the pod requests (e.g. 64Gi)")

    def run(self, context, *, command: list[str], cwd: str, env: dict[str, str], data_dir: str):
        """Start the child and wait for it; Dagster Pipes carries its logs and report either way."""
        if self.kind == "local":
            from dagster import PipesSubprocessClient

            from resources.pipes_reader import WholeLineTempFileMessageReader

            client = PipesSubprocessClient(message_reader=WholeLineTempFileMessageReader())
            return client.run(context=context, command=command, cwd=cwd, env=env)
        if not self.image:
            raise ValueError("training_launcher kind kubernetes needs an image (the project and its dependencies)")
        spec = pod_spec(
            data_dir,
            gpus=self.gpus,
            volume_claim=self.volume_claim,
            service_account=self.service_account,
            cpu=self.cpu,
            memory=self.memory,
        )
        pod_env = {k: v for k, v in env.items() if k in POD_ENV}
        return self.k8s_client().run(
            context=context,
            image=self.image,
            command=command,
            namespace=self.namespace,
            env={**pod_env, "MEDTUNE_DATA_DIR": data_dir},
            base_pod_spec=spec,
        )

    def k8s_client(self):
        try:
            from dagster_k8s import PipesK8sClient
        except ImportError:
            raise ImportError("training_launcher kind kubernetes needs dagster-k8s: pip install -e '.[k8s]'") from None
        return PipesK8sClient()


# what the pod gets of this process's environment: no secrets, no local paths (the child
# talks to no tracking server: the asset sends its metrics to MLflow)
POD_ENV = ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
