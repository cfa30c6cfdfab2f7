"""Stage (asset ``registered_model``): the MLflow Model Registry.

A merged model that passed both gates (``tuned_beats_base`` and ``merged_matches_adapter``) is
logged to its training's MLflow run as a pyfunc model (the merged folder as an artifact, the
wrapper in ``pipeline/stages/registered_model/serving.py``), registered under a name (default ``medtune``) and given the
alias ``challenger``. It takes ``champion`` when there is none, or when it wins by the rule
``promote_on`` (default: held-out loss must not rise, then the medicine-choice accuracy over the
evaluated rows, then held-out ROUGE-L: :func:`decide_champion`); the version's description says
the rule and the figures that decided. The same merged model registered twice reuses its version.

A prompt-learning adapter cannot be merged: it is logged with its base model (two artifacts,
``base`` and ``adapter``), and the pyfunc loads both (peft's own generation).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

CHALLENGER = "challenger"
CHAMPION = "champion"
SCORE_TAG = "medtune.eval_rouge_l"
# the figures a version is judged on, as tags of the version (a champion registered before a figure
# existed simply lacks it: that criterion is then skipped)
FIGURE_TAGS = {"eval_loss": "medtune.eval_loss", "choice_accuracy": "medtune.choice_accuracy", "rouge_l": SCORE_TAG}
LOWER_IS_BETTER = {"eval_loss"}
GUARDS = {"eval_loss"}  # must not get worse; never decides by improving
DEFAULT_PROMOTE_ON = ("eval_loss", "choice_accuracy", "rouge_l")
MERGED_TAG = "medtune.merged_id"
DATA_TAG = "medtune.data"  # the training run's dataset inputs, named
FIGURE_LABELS = {
    "eval_loss": "held-out answer loss (eval_loss)",
    "choice_accuracy": "medicine choice over every evaluated row, held-out and sampled training (choice_accuracy)",
    "rouge_l": "held-out ROUGE-L (rouge_l)",
}
SERVING_FILE = Path(__file__).with_name("serving.py")
PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "pandas"]


class RegistrySettings(BaseModel):
    """The registry name, the served answer length and the champion rule (asset ``registered_model``)."""

    model_name: str = Field(
        "medtune",
        pattern=r"^[^'\"`\\]+$",
        description="Name in the MLflow Model Registry (no quotes or backslashes: it goes into search filters)",
    )
    max_new_tokens: int = Field(256, gt=0, description="Answer length limit of the registered model's predict()")
    promote_on: list[str] = Field(
        list(DEFAULT_PROMOTE_ON),
        description="When a new version takes champion: criteria in order, "
        "from " + ", ".join(FIGURE_TAGS) + ". eval_loss is a guard (must not rise); of the others "
        "(higher is better) the first that differs decides; a tie keeps the champion",
    )


def chat_signature(max_new_tokens: int):
    """The pyfunc's signature: chat-completions params, checked by MLflow (a wrong type is a 400 from
    ``mlflow models serve``); the input is left to the wrapper, which takes chat requests and lists
    of questions alike (an input schema admits only one of them)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(
        params=ParamSchema(
            [
                ParamSpec("max_tokens", "long", int(max_new_tokens)),
                ParamSpec("temperature", "double", 0.0),  # 0: greedy, the evaluation's decoding
                ParamSpec("top_p", "double", 1.0),
                ParamSpec("top_k", "long", 0),
                ParamSpec("stop", "string", [], (-1,)),
                ParamSpec("n", "long", 1),
                ParamSpec("stream", "boolean", False),
            ]
        )
    )


def pyfunc_model_kwargs(
    artifacts: dict[str, str], *, system_prompt: str, max_new_tokens: int, model_name: str
) -> dict[str, Any]:
    """What ``mlflow.pyfunc.log_model`` / ``save_model`` get for a merged folder (``{"model": dir}``) or a
    prompt-learning adapter over its base (``{"base": dir, "adapter": dir}``)."""
    requirements = PIP_REQUIREMENTS if "model" in artifacts else [*PIP_REQUIREMENTS, "peft"]
    return {
        "python_model": str(SERVING_FILE),
        "artifacts": artifacts,
        "model_config": {
            "system_prompt": system_prompt,
            "max_new_tokens": int(max_new_tokens),
            "model_name": model_name,
        },
        "signature": chat_signature(max_new_tokens),
        "pip_requirements": requirements,
    }


@dataclass
class Registration:
    name: str
    version: str
    model_uri: str
    aliases: list[str]
    became_champion: bool
    previous_champion: str | None
    previous_champion_score: float | None  # its ROUGE-L
    reused: bool
    decided_by: str = ""  # what decide_champion said

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RegisteredModel:
    """What ``registered_model`` hands on: the version registered, or why none was (``reason``)."""

    registered: bool
    name: str
    reason: str = ""
    version: str | None = None
    model_uri: str | None = None
    aliases: list[str] = field(default_factory=list)
    became_champion: bool = False
    previous_champion: str | None = None
    previous_champion_score: float | None = None
    reused: bool = False
    decided_by: str = ""


@contextlib.contextmanager
def _uris(uri: str):
    """mlflow's fluent API with this tracking and registry URI, the process's globals restored after
    (a long-running Dagster process must not keep pointing at the last store it registered in)."""
    import mlflow

    # what the process had: set_tracking_uri writes its URI to the environment, so the environment
    # holds it (or the user's own setting); None: nothing set
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])  # public API; None unsets
        mlflow.set_registry_uri(env["MLFLOW_REGISTRY_URI"])
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


def _newer_version(client, name: str, version: str) -> bool:
    return any(int(v.version) > int(version) for v in client.search_model_versions(f"name = '{name}'"))


def decide_champion(
    new: dict[str, float | None],
    champion: dict[str, float | None] | None,
    promote_on: tuple[str, ...] | list[str] = DEFAULT_PROMOTE_ON,
) -> tuple[bool, str]:
    """Whether the new version takes ``champion``, and why. No champion: it does. Otherwise the
    criteria in ``promote_on`` are read in order: a guard (``eval_loss``) that got worse keeps the
    champion; any other criterion (higher is better) that differs decides; a figure either side
    lacks is skipped; all equal keeps the champion (a tie does not beat it)."""
    if champion is None:
        return True, "there was no champion"
    unknown = [c for c in promote_on if c not in FIGURE_TAGS]
    if unknown:
        raise ValueError(f"promote_on: unknown criteria {unknown}; choose from {sorted(FIGURE_TAGS)}")
    for criterion in promote_on:
        a, b = new.get(criterion), champion.get(criterion)
        if a is None or b is None or a == b:
            continue
        better = a < b if criterion in LOWER_IS_BETTER else a > b
        said = f"{criterion} {a:.4f} vs the champion's {b:.4f}"
        if criterion in GUARDS:
            if not better:
                return False, f"{said}: it must not get worse"
            continue
        return better, said
    return False, "no criterion of " + ", ".join(promote_on) + " separates it from the champion"


def _figures(tags: dict[str, str]) -> dict[str, float | None]:
    return {k: float(tags[t]) if tags.get(t) not in (None, "", "None") else None for k, t in FIGURE_TAGS.items()}


def model_metrics(summary: dict) -> dict[str, float]:
    """The logged model's figures: the tuned model's as its own, named for what they measure, and the
    base model's beside them with ``base_`` in front."""
    names = {
        ("eval", "loss"): "heldout_loss",
        ("eval", "rouge_l"): "heldout_rouge_l",
        ("eval", "bleu_4"): "heldout_bleu_4",
        ("eval", "choice_accuracy"): "heldout_choice_accuracy",
        ("eval", "seen_medicine_choice_accuracy"): "heldout_seen_medicine_choice_accuracy",
        ("train_sample", "choice_accuracy"): "train_sample_choice_accuracy",
    }
    out = {}
    for model, prefix in (("tuned", ""), ("base", "base_")):
        for (split, key), name in names.items():
            value = summary.get(model, {}).get(split, {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                out[prefix + name] = float(value)
    return out


def data_line(run) -> str:
    """The run's dataset inputs in one line: ``context: name (digest, rows)``."""
    import json

    parts = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        rows = json.loads(item.dataset.profile or "{}").get("num_rows")
        parts.append(f"{context}: {item.dataset.name} (digest {item.dataset.digest}, {rows} rows)")
    return "; ".join(parts)


def _next_step(client, run_id: str) -> int:
    """One past the last step the training logged."""
    steps = [m.step for key in ("train_loss", "eval_loss") for m in client.get_metric_history(run_id, key)]
    return max(steps, default=0) + 1


def _log_model_metrics(client, run_id: str, model_id: str, step: int, metrics: dict[str, float]) -> None:
    """``metrics`` as the logged model's, each linked to the eval data the run read."""
    import time

    from mlflow.entities import Metric

    run = client.get_run(run_id)
    evals = [d.dataset for d in (run.inputs.dataset_inputs if run.inputs else []) if d.dataset.name.endswith("eval")]
    name, digest = (evals[0].name, evals[0].digest) if evals else (None, None)
    now = int(time.time() * 1000)
    batch = [
        Metric(k, v, now, step, model_id=model_id, dataset_name=name, dataset_digest=digest) for k, v in metrics.items()
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def describe_version(figures: dict, tags: dict, promote_on, verdict: str) -> str:
    """The version's description: each figure named for what it measures, the data it was trained on,
    the promotion rule and how it fared against the champion."""
    shown = "; ".join(f"{FIGURE_LABELS[k]} {'n/a' if x is None else f'{x:.4f}'}" for k, x in figures.items())
    return (
        f"{shown}. Trained on {tags.get(DATA_TAG) or 'data not recorded'} (the source run's Datasets). "
        f"Promotion rule promote_on = {', '.join(promote_on)} (a guard: eval_loss must not rise; then the first "
        f"criterion that differs decides, higher is better). Against the champion at registration: {verdict}."
    )


def register_merged_model(
    tracking_uri: str,
    *,
    name: str,
    merged_dir: str | None,
    merged_id: str,
    run_id: str,
    figures: dict[str, float | None],
    tags: dict[str, str],
    system_prompt: str,
    max_new_tokens: int = 256,
    adapter_dir: str | None = None,
    base_dir: str | None = None,
    promote_on: tuple[str, ...] | list[str] = DEFAULT_PROMOTE_ON,
    model_metrics: dict[str, float] | None = None,
) -> Registration:
    """Register ``merged_dir``; or, where there is no merged model, ``adapter_dir`` over ``base_dir``.
    ``figures``: the version's ``eval_loss``, ``choice_accuracy`` and ``rouge_l`` (None where not
    measured), judged against the champion's by ``promote_on``. ``model_metrics``: the logged
    model's own figures (``model_metrics``), linked to the run's eval data."""
    from mlflow.tracking import MlflowClient

    import mlflow

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = existing_version(client, name, merged_id)
    reused = version is not None
    # registered, then the process died before its alias and description (written last): finish it
    finished = reused and bool(version.description)
    if version is None:
        with _uris(tracking_uri):
            with mlflow.start_run(run_id=run_id):
                if merged_dir is not None:
                    artifacts = {"model": str(merged_dir)}
                elif adapter_dir and base_dir:
                    artifacts = {"base": str(base_dir), "adapter": str(adapter_dir)}
                else:
                    raise ValueError("register a merged model folder, or an adapter folder with its base model folder")
                # at a step nothing else was logged at: MLflow links the run's metrics of that step to the
                # model, and step 0 holds the base model's first evaluation
                step = _next_step(client, run_id)
                info = mlflow.pyfunc.log_model(
                    name="merged_model" if merged_dir is not None else "adapter_model",
                    step=step,
                    **pyfunc_model_kwargs(
                        artifacts, system_prompt=system_prompt, max_new_tokens=max_new_tokens, model_name=name
                    ),
                )
                _log_model_metrics(client, run_id, info.model_id, step, model_metrics or {})
            figure_tags = {t: "" if figures.get(k) is None else f"{figures[k]:.6f}" for k, t in FIGURE_TAGS.items()}
            data = {DATA_TAG: data_line(client.get_run(run_id))[:5000]}
            version = mlflow.register_model(
                info.model_uri, name, tags={**tags, MERGED_TAG: merged_id, **figure_tags, **data}
            )
    v = str(version.version)
    mine = _figures(version.tags or {})
    champion = _alias_version(client, name, CHAMPION)
    champ_version = str(champion.version) if champion is not None else None
    champ_figures = _figures(champion.tags or {}) if champion is not None else None
    if not finished and not _newer_version(client, name, v):
        client.set_registered_model_alias(name, CHALLENGER, v)
    became, why = False, "it is the champion already" if champ_version == v else ""
    if champ_version != v:
        became, why = decide_champion(mine, champ_figures, promote_on)
        if became:
            client.set_registered_model_alias(name, CHAMPION, v)
    if not finished:
        verdict = (
            f"took champion ({why})" if became else f"stayed challenger; champion: version {champ_version} ({why})"
        )
        client.update_model_version(
            name, v, description=describe_version(mine, version.tags or {}, promote_on, verdict)
        )
    aliases = sorted(client.get_model_version(name, v).aliases)
    champ_score = champ_figures.get("rouge_l") if champ_figures else None
    return Registration(name, v, f"models:/{name}/{v}", aliases, became, champ_version, champ_score, reused, why)
