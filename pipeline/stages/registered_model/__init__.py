"""Stage (asset ``registered_model``): the MLflow Model Registry.

A merged model that passed both gates (``tuned_beats_base`` and ``merged_matches_adapter``) is
logged to its training's MLflow run as a pyfunc model (the merged folder as an artifact, the
wrapper in ``pipeline/stages/registered_model/serving.py``), registered under a name (default ``medtune``) and given the
alias ``challenger``. It takes ``champion`` when its eval ROUGE-L beats the current champion's, or
when there is no champion. The same merged model registered twice reuses its version.

A prompt-learning adapter cannot be merged: it is logged with its base model (two artifacts,
``base`` and ``adapter``), and the pyfunc loads both (peft's own generation).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CHALLENGER = "challenger"
CHAMPION = "champion"
SCORE_TAG = "medtune.eval_rouge_l"
MERGED_TAG = "medtune.merged_id"
SERVING_FILE = Path(__file__).with_name("serving.py")
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "pandas"]


@dataclass
class Registration:
    name: str
    version: str
    model_uri: str
    aliases: list[str]
    became_champion: bool
    previous_champion: str | None
    previous_champion_score: float | None
    reused: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _uris(uri: str):
    """mlflow's fluent API with this tracking and registry URI, the process's globals restored after
    (a long-running Dagster process must not keep pointing at the last store it registered in)."""
    import mlflow
    from mlflow.tracking import _model_registry, _tracking_service

    saved = (_tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri)
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        _tracking_service.utils._tracking_uri, _model_registry.utils._registry_uri = saved
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def existing_version(client, name: str, merged_id: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in versions:
        if (v.tags or {}).get(MERGED_TAG) == merged_id:
            return v
    return None


def decide_champion(score: float, champion_score: float | None) -> bool:
    """The new version takes ``champion`` when there is none or it scores strictly higher."""
    return champion_score is None or score > champion_score


def register_merged_model(
    tracking_uri: str,
    *,
    name: str,
    merged_dir: str | None,
    merged_id: str,
    run_id: str,
    score: float,
    tags: dict[str, str],
    system_prompt: str,
    max_new_tokens: int = 256,
    adapter_dir: str | None = None,
    base_dir: str | None = None,
) -> Registration:
    """Register ``merged_dir``; or, where there is no merged model, ``adapter_dir`` over ``base_dir``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = existing_version(client, name, merged_id)
    reused = version is not None
    if version is None:
        with _uris(tracking_uri):
            with mlflow.start_run(run_id=run_id):
                if merged_dir is not None:
                    artifacts, requirements = {"model": str(merged_dir)}, PIP_REQUIREMENTS
                elif adapter_dir and base_dir:
                    artifacts, requirements = {"base": str(base_dir), "adapter": str(adapter_dir)}, [*PIP_REQUIREMENTS, "peft"]
                else:
                    raise ValueError("register a merged model folder, or an adapter folder with its base model folder")
                info = mlflow.pyfunc.log_model(
                    name="merged_model" if merged_dir is not None else "adapter_model",
                    python_model=str(SERVING_FILE),
                    artifacts=artifacts,
                    model_config={"system_prompt": system_prompt, "max_new_tokens": max_new_tokens},
                    pip_requirements=requirements,
                )
            all_tags = {**tags, MERGED_TAG: merged_id, SCORE_TAG: f"{score:.6f}"}
            version = mlflow.register_model(info.model_uri, name, tags=all_tags)
    v = str(version.version)
    score = float((version.tags or {}).get(SCORE_TAG, score))
    champion = _alias_version(client, name, CHAMPION)
    champ_version = str(champion.version) if champion is not None else None
    champ_score = float(champion.tags.get(SCORE_TAG)) if champion is not None and champion.tags.get(SCORE_TAG) else None
    if not reused:
        client.set_registered_model_alias(name, CHALLENGER, v)
    became = False
    if champ_version != v and decide_champion(score, champ_score):
        client.set_registered_model_alias(name, CHAMPION, v)
        became = True
    aliases = sorted(client.get_model_version(name, v).aliases)
    return Registration(name, v, f"models:/{name}/{v}", aliases, became, champ_version, champ_score, reused)
