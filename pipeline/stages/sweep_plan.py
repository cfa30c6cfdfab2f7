"""Stage (asset ``sweep_plan``): a sweep's grid expanded into named trials.

A sweep is the exercises "vary the rank", "compare methods", "compare with full fine-tuning" in
one definition::

    name: sweep-cpu
    base: {max_steps: 40}                       # lora_adapter settings every trial shares
    grid: {method: [lora, dora], r: [16, 64]}   # every combination is a trial
    trials: [{method: full, learning_rate: 5e-5}]   # and these single trials
    per_method: {prompt_tuning: {learning_rate: 0.03}}   # a method's own defaults in this sweep

A trial's settings are ``base``, then ``per_method[method]``, then its grid point or entry (the
most specific wins). Its label names what varies (``lora-r16``); its Dagster partition key is
``<sweep>.<label>``. The plan is written to ``sweeps/<name>/plan.json``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
SHORT = {
    "method": "",
    "r": "r",
    "learning_rate": "lr",
    "lora_alpha": "a",
    "num_virtual_tokens": "v",
    "epochs": "ep",
    "max_steps": "s",
}
PARTITIONS = "sweep_trials"  # the dynamic partitions of sweep_trial


class SweepSettings(BaseModel):
    """A sweep's name, grid and trials (asset ``sweep_plan``)."""

    name: str = Field(
        "sweep",
        description="The sweep's name (its folder under sweeps/, its MLflow parent run, its partition keys' prefix)",
    )
    base: dict[str, Any] = Field(default_factory=dict, description="lora_adapter settings every trial shares")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Setting -> values: every combination is a trial"
    )
    trials: list[dict[str, Any]] = Field(default_factory=list, description="Single trials (settings; optional 'label')")
    per_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Method -> its settings in this sweep"
    )
    evaluation: dict[str, Any] = Field(
        default_factory=lambda: {"max_new_tokens": 32, "train_sample_size": 8},
        description="evaluation_report settings for the trials (shorter answers than the pipeline's: a sweep compares)",
    )


class SweepError(ValueError):
    pass


@dataclass(frozen=True)
class SweepPlan:
    """What ``sweep_plan`` hands on: the sweep, its trials' partition keys and its MLflow parent run."""

    name: str
    partition_keys: list[str]
    parent_run_id: str
    fingerprint: str


@dataclass
class Trial:
    label: str
    settings: dict[str, Any]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # never a path: no '/', no leading '.'


def _label(point: dict[str, Any]) -> str:
    parts = [f"{SHORT.get(k, k)}{_fmt(v)}" for k, v in point.items()]
    label = "-".join(p for p in parts if p) or "base"
    return re.sub(r"[^a-z0-9_.-]+", "_", label.lower())


def expand(
    base: dict[str, Any], grid: dict[str, list], trials: list[dict[str, Any]], per_method: dict[str, dict[str, Any]]
) -> list[Trial]:
    """The sweep's trials, in grid order then the explicit ones; duplicates (same settings) once."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key} must be a non-empty list, not {values!r}")
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else []
    points += [dict(t) for t in trials]
    if not points:
        raise SweepError("the sweep has no trials: give a grid, trials, or both")
    out: list[Trial] = []
    seen: dict[str, str] = {}
    for point in points:
        method = point.get("method", base.get("method", "lora"))
        settings = {**base, **per_method.get(method, {}), **point}
        label = point.pop("label", None) or _label(point)
        settings.pop("label", None)
        if not LABEL.fullmatch(str(label)):
            raise SweepError(
                f"trial label {label!r}: use letters, digits, '_', '.' and '-' (it names the trial's files and "
                "partition)"
            )
        fingerprint = repr(sorted(settings.items()))
        if fingerprint in seen:
            continue
        if label in {t.label for t in out}:
            raise SweepError(f"two trials are named {label!r}: give them distinct 'label's")
        seen[fingerprint] = label
        out.append(Trial(label, settings))
    return out


def partition_key(sweep: str, label: str) -> str:
    return f"{sweep}.{label}"


def split_key(key: str) -> tuple[str, str]:
    sweep, _, label = key.partition(".")
    if not sweep or not label:
        raise SweepError(f"{key!r} is not a sweep trial key (<sweep>.<label>)")
    return sweep, label


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise SweepError(f"sweep name {name!r}: use lower-case letters, digits, '-' and '_' (at most 48)")
    return name
