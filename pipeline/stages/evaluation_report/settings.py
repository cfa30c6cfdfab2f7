"""The evaluation's settings, declared once: the ``evaluation_report`` asset's config is this class
(with its preview length), ``EvalConfig`` adds what the asset finds in the data, and
``docs/configuration.md`` is generated from it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EvaluationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(
        64, gt=0, description="Greedy answer length limit (an answer stops earlier at the end-of-turn token)"
    )
    train_sample_size: int = Field(
        16, ge=0, description="Train rows added to the eval rows, a fixed sample (what the model absorbed)"
    )
    train_sample_loss: bool = Field(
        False,
        description=(
            "Also the answer loss on the train sample (a forward over each whole answer, most of the work on long "
            "answers); "
            "off, those rows run their prompt only and the training's loss curve gives the train loss"
        ),
    )
    batch_size: int = Field(
        64,
        gt=0,
        description="Rows decoded together (their prompt caches stacked with left padding); "
        "each row's own forward gives its loss, cache and medicine-choice scores first",
    )
    seed: int = Field(42, ge=0, description="Seed of the train sample")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Weights of both models while evaluating (auto: bf16 where the CPU or GPU supports it, else fp32)",
    )
    choice_scoring: bool = Field(
        True, description="Score medicine choice by likelihood (every medicine named in the data's answers)"
    )
