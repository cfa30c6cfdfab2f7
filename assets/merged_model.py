"""Asset ``merged_model``: the adapter merged into a 32-bit (or 16-bit) copy of the base weights (``pipeline.stages.merged_model``).

Written under ``$MEDTUNE_DATA_DIR/models/merged/<id>/`` through a temporary folder renamed into
place: safetensors (sharded when large), config, tokenizer with its chat template, and a
generation config whose end-of-sequence id is the end-of-turn token. Loads with plain
``AutoModelForCausalLM`` / ``AutoTokenizer`` (no peft); what vLLM or TGI would serve.
Blocking check ``merged_matches_adapter``: the merged model's logits equal the adapter model's
within the tolerance (fp32) on a handful of eval prompts, and their greedy answers are identical.

A ``full`` fine-tuning's export is the trained model itself (same fixes, same check against the
trained model as evaluated). Prompt-learning adapters (prompt, prefix, P-tuning) cannot be merged:
nothing is written, the metadata says so, and ``registered_model`` registers the adapter with its base.
"""

import json
from pathlib import Path
from typing import Literal

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from pipeline.stages.evaluation_report import load_tuned_model
from pipeline.stages.lora_adapter.inference import trained_method
from pipeline.stages.lora_adapter.methods import is_prompt_learning
from pipeline.stages.merged_model import DEFAULT_TOLERANCE, compare_with_adapter, load_merged, merge_adapter, read_export_record
from pipeline.core.cache import KEY_CHARS, keyed_folder
from pipeline.core.fingerprint import sha256_json
from pipeline.stages.base_model import BaseModelInfo
from pipeline.stages.tokenized_dataset import MANIFEST, TokenizedDataset, render_prompt
from resources.data_root import DataRoot

EXPORT_FORMAT = 2  # 2: float64 merge, float64 check


class MergedModelConfig(Config):
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights of the merged copy (never quantized)")
    max_shard_size: str = Field("2GB", description="safetensors shard size")
    check_prompts: int = Field(4, gt=0, description="Eval prompts the merge check runs")
    check_max_new_tokens: int = Field(32, gt=0)
    tolerance: float = Field(DEFAULT_TOLERANCE, gt=0, description="Max absolute logit difference")
    check_precision: Literal["float64", "native"] = Field(
        "float64",
        description="Arithmetic of the logit comparison: float64 over the fp32 weights as they are (measures the merge, "
        "not fp32 rounding noise, which is ~1e-4 on SmolLM2), or the weights' own dtype",
    )


def _check_prompts(alpaca_path: str, tokenizer, system_prompt: str, n: int) -> list[str]:
    df = pd.read_parquet(alpaca_path, columns=["instruction", "input", "split"])
    rows = pd.concat([df[df["split"] == "eval"], df[df["split"] == "train"]]).head(n)
    return [render_prompt(tokenizer, i, x, system_prompt) for i, x in zip(rows["instruction"], rows["input"])]


def merged_key(config: MergedModelConfig, adapter_id: str, base_fingerprint: str) -> str:
    """The merged model's id (its folder): adapter, base weights and every export setting."""
    return sha256_json({"format": EXPORT_FORMAT, "adapter": adapter_id, "base": base_fingerprint, **config.model_dump()})[:KEY_CHARS]


@asset(
    group_name="model",
    compute_kind="safetensors",
    description=__doc__,
    check_specs=[AssetCheckSpec("merged_matches_adapter", asset="merged_model", blocking=True,
                                description="Merged logits equal the adapter model's (max abs diff, float64 over the fp32 weights) and greedy answers are identical")],
)
def merged_model(
    context: AssetExecutionContext,
    config: MergedModelConfig,
    data_root: DataRoot,
    base_model: BaseModelInfo,
    lora_adapter: dict,
    alpaca_dataset: dict,
    tokenized_dataset: TokenizedDataset,
):
    mid = merged_key(config, lora_adapter["adapter_id"], base_model.fingerprint)
    method = lora_adapter.get("method") or trained_method(lora_adapter["path"])
    if is_prompt_learning(method):
        yield from _not_mergeable(context, method, mid, lora_adapter, base_model)
        return
    dest = keyed_folder(data_root.models_dir / "merged", mid)
    record = read_export_record(dest)
    cache_hit = bool(record and record.get("verification", {}).get("passed"))
    if cache_hit:
        context.log.info(f"cache hit: merged model {mid} already exported and verified")
    else:
        adapter_model, tokenizer = load_tuned_model(base_model.path, lora_adapter["path"], base_model.trust_remote_code)
        prompts = _check_prompts(alpaca_dataset["path"], tokenizer, json.loads((Path(tokenized_dataset.path) / MANIFEST).read_text())["system_prompt"], config.check_prompts)

        def verify(folder):
            merged = load_merged(folder, base_model.trust_remote_code)
            result = compare_with_adapter(adapter_model, merged, tokenizer, prompts,
                                          max_new_tokens=config.check_max_new_tokens, tolerance=config.tolerance,
                                          precision=config.check_precision)
            return result.as_dict()

        context.log.info(f"merging adapter {lora_adapter['adapter_id']} into a {config.dtype} copy of {base_model.model}")
        record = merge_adapter(
            base_model.path, lora_adapter["path"], dest, dtype=config.dtype, max_shard_size=config.max_shard_size,
            trust_remote_code=base_model.trust_remote_code, verify=verify,
            record={"merged_id": mid, "adapter_id": lora_adapter["adapter_id"], "base_model": base_model.model,
                    "base_model_fingerprint": base_model.fingerprint, "mlflow_run_id": lora_adapter.get("mlflow_run_id")},
        )
    check = record["verification"]
    size = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    (context.log.info if check["passed"] else context.log.error)(
        f"merged_matches_adapter: {'passed' if check['passed'] else 'FAILED'}: max |Δlogit| {check['max_abs_logit_diff']:.2e} "
        f"in {check.get('precision', 'native')} (tolerance {check['tolerance']:.0e}; in the weights' dtype "
        f"{check.get('max_abs_logit_diff_native') or check['max_abs_logit_diff']:.2e}), greedy answers identical: {check['greedy_identical']}")
    yield Output(
        {"path": str(dest), "merged_id": mid, "mergeable": True, "method": method, "verification": check,
         "adapter_id": lora_adapter["adapter_id"],
         "mlflow_run_id": lora_adapter.get("mlflow_run_id")},
        metadata={
            "cache_hit": cache_hit,
            "mergeable": True,
            "method": method,
            "merged_id": mid,
            "path": MetadataValue.path(str(dest)),
            "dtype": config.dtype,
            "files": MetadataValue.json(record.get("files", [])),
            "weights_bytes": size,
            "end_of_turn_id": record.get("end_of_turn_id"),
            "max_abs_logit_diff": check["max_abs_logit_diff"],
            "max_abs_logit_diff_native": check.get("max_abs_logit_diff_native"),
            "check_precision": check.get("precision", "native"),
            "greedy_identical": check["greedy_identical"],
        },
    )
    yield AssetCheckResult(
        check_name="merged_matches_adapter",
        passed=bool(check["passed"]),
        severity=AssetCheckSeverity.ERROR,
        description=(f"max |Δlogit| {check['max_abs_logit_diff']:.2e} ({check.get('precision', 'native')}) ≤ {check['tolerance']:.0e} "
                     f"and identical greedy answers on {check['prompts']} prompts") if check["passed"] else
                    (f"merged model differs from the adapter model: max |Δlogit| {check['max_abs_logit_diff']:.2e} "
                     f"(tolerance {check['tolerance']:.0e}); greedy identical: {check['greedy_identical']}; {check.get('first_mismatch') or ''}"),
        metadata={"max_abs_logit_diff": check["max_abs_logit_diff"], "greedy_identical": check["greedy_identical"],
                  "max_abs_logit_diff_native": check.get("max_abs_logit_diff_native"), "check_precision": check.get("precision", "native"),
                  "prompts": check["prompts"], "tolerance": check["tolerance"]},
    )


def _not_mergeable(context, method: str, mid: str, lora_adapter: dict, base_model: BaseModelInfo):
    reason = (f"{method} cannot be merged into the base weights: it adds virtual tokens, not weight updates, so it "
              f"is served as adapter + base (registered_model logs both)")
    context.log.info(reason)
    yield Output(
        {"path": None, "merged_id": mid, "mergeable": False, "method": method, "reason": reason,
         "adapter_path": lora_adapter["path"], "base_model_path": base_model.path,
         "verification": {"passed": True, "applicable": False, "reason": reason},
         "adapter_id": lora_adapter["adapter_id"], "mlflow_run_id": lora_adapter.get("mlflow_run_id")},
        metadata={"mergeable": False, "method": method, "reason": reason, "merged_id": mid,
                  "adapter_path": MetadataValue.path(lora_adapter["path"])},
    )
    yield AssetCheckResult(check_name="merged_matches_adapter", passed=True, severity=AssetCheckSeverity.WARN,
                           description=f"not applicable: {reason}", metadata={"applicable": False, "method": method})
