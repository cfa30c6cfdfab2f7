"""Asset ``merged_model``: the adapter merged into a 32-bit (or 16-bit) copy of the base weights
(``pipeline.stages.merged_model``).

Written under ``$MEDTUNE_DATA_DIR/models/merged/<id>/`` through a temporary folder renamed into
place: safetensors (sharded when large), config, tokenizer with its chat template, and a
generation config whose end-of-sequence id is the end-of-turn token. Loads with plain
``AutoModelForCausalLM`` / ``AutoTokenizer`` (no peft); what vLLM or TGI would serve.
The merge reads and writes one tensor at a time (peak memory about one tensor in float64 plus
the adapter, whatever the base's size). Blocking check ``merged_matches_adapter``: every adapted
layer of the written files, on random inputs in float64, computes what the adapter model computes,
up to the rounding of the weights to their dtype; and, where both models fit in memory, the merged
model's logits equal the adapter model's within the tolerance (in the weights' dtype) on a handful
of eval prompts, with identical greedy answers.

A ``full`` fine-tuning's export is the trained model itself (same fixes, same check against the
trained model as evaluated). Prompt-learning adapters (prompt, prefix, P-tuning) cannot be merged:
nothing is written, the metadata says so, and ``registered_model`` registers the adapter with its base.
"""

import json
from pathlib import Path

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

from pipeline.core.cache import KEY_CHARS, keyed_folder
from pipeline.core.fingerprint import sha256_json
from pipeline.core.pool_limit import INFERENCE_POOL
from pipeline.stages.alpaca_dataset import AlpacaDataset
from pipeline.stages.base_model import BaseModelInfo
from pipeline.stages.lora_adapter import LoraAdapter
from pipeline.stages.lora_adapter.generation import load_tuned_model
from pipeline.stages.lora_adapter.methods import is_prompt_learning
from pipeline.stages.lora_adapter.spec import trained_method
from pipeline.stages.merged_model import (
    DEFAULT_TOLERANCE,
    NATIVE_TOLERANCE,
    MergeSettings,
    compare_with_adapter,
    load_merged,
    merge_adapter,
    read_export_record,
)
from pipeline.stages.merged_model.record import MergedModel
from pipeline.stages.merged_model.streamed import fits_in_memory
from pipeline.stages.tokenized_dataset import MANIFEST, TokenizedDataset, render_prompt
from resources.data_root import DataRoot

EXPORT_FORMAT = (
    3  # 2: float64 merge, float64 check; 3: streamed merge, layer-wise proof, end-to-end in the weights' dtype
)


class MergedModelConfig(Config, MergeSettings):
    """The merged copy's weights and the check that it matches the adapter
    (declared in ``pipeline.stages.merged_model.MergeSettings``)."""


def _check_prompts(alpaca_path: str, tokenizer, system_prompt: str, n: int) -> list[str]:
    df = pd.read_parquet(alpaca_path, columns=["instruction", "input", "split"])
    rows = pd.concat([df[df["split"] == "eval"], df[df["split"] == "train"]]).head(n)
    return [render_prompt(tokenizer, i, x, system_prompt) for i, x in zip(rows["instruction"], rows["input"])]


def merged_key(config: MergedModelConfig, adapter_id: str, base_fingerprint: str) -> str:
    """The merged model's id (its folder): adapter, base weights and every export setting."""
    return sha256_json(
        {"format": EXPORT_FORMAT, "adapter": adapter_id, "base": base_fingerprint, **config.model_dump()}
    )[:KEY_CHARS]


@asset(
    group_name="model",
    compute_kind="safetensors",
    description=__doc__,
    pool=INFERENCE_POOL,
    check_specs=[
        AssetCheckSpec(
            "merged_matches_adapter",
            asset="merged_model",
            blocking=True,
            description=(
                "Every merged layer proven against the adapter in float64; the merged model's logits "
                "within tolerance of the adapter model's (in check_precision) and its greedy answers identical"
            ),
        )
    ],
)
def merged_model(
    context: AssetExecutionContext,
    config: MergedModelConfig,
    data_root: DataRoot,
    base_model: BaseModelInfo,
    lora_adapter: LoraAdapter,
    alpaca_dataset: AlpacaDataset,
    tokenized_dataset: TokenizedDataset,
):
    mid = merged_key(config, lora_adapter.adapter_id, base_model.fingerprint)
    method = lora_adapter.method or trained_method(lora_adapter.path)
    if is_prompt_learning(method):
        yield from _not_mergeable(context, method, mid, lora_adapter, base_model)
        return
    dest = keyed_folder(data_root.models_dir / "merged", mid)
    record = read_export_record(dest)
    cache_hit = bool(record and record.get("verification", {}).get("passed"))
    if cache_hit:
        context.log.info(f"cache hit: merged model {mid} already exported and verified")
    else:
        verify = _verifier(context, config, base_model, lora_adapter, alpaca_dataset, tokenized_dataset)
        record = _merge(context, config, base_model, lora_adapter, dest, mid, verify)
    check = record["verification"]
    said = describe_check(check)
    (context.log.info if check["passed"] else context.log.error)(
        f"merged_matches_adapter: {'passed' if check['passed'] else 'FAILED'}: {said}"
    )
    yield _output(config, lora_adapter, dest, mid, method, record, cache_hit)
    yield _check_result(check, said)


def _verifier(
    context,
    config: MergedModelConfig,
    base_model: BaseModelInfo,
    lora_adapter: LoraAdapter,
    alpaca_dataset: AlpacaDataset,
    tokenized_dataset,
):
    """``verify(folder)``: the merged model against the adapter on a few prompts, where both fit in memory."""

    def verify(folder):
        fits, why = fits_in_memory(folder, copies=2 if config.check_precision == "native" else 4)
        if not fits:
            context.log.info(f"end-to-end comparison skipped ({why}): the layer-wise proof decides")
            return {"end_to_end": f"skipped: {why}"}
        adapter_model, tokenizer = load_tuned_model(base_model.path, lora_adapter.path, base_model.trust_remote_code)
        system_prompt = json.loads((Path(tokenized_dataset.path) / MANIFEST).read_text())["system_prompt"]
        prompts = _check_prompts(alpaca_dataset.path, tokenizer, system_prompt, config.check_prompts)
        tolerance = config.tolerance or (NATIVE_TOLERANCE if config.check_precision == "native" else DEFAULT_TOLERANCE)
        merged = load_merged(folder, base_model.trust_remote_code)
        result = compare_with_adapter(
            adapter_model,
            merged,
            tokenizer,
            prompts,
            max_new_tokens=config.check_max_new_tokens,
            tolerance=tolerance,
            precision=config.check_precision,
        )
        return {**result.as_dict(), "end_to_end": "compared"}

    return verify


def _merge(
    context,
    config: MergedModelConfig,
    base_model: BaseModelInfo,
    lora_adapter: LoraAdapter,
    dest: Path,
    mid: str,
    verify,
) -> dict:
    context.log.info(
        f"merging adapter {lora_adapter.adapter_id} into a {config.dtype} copy of {base_model.model}, one "
        "tensor at a time"
    )
    return merge_adapter(
        base_model.path,
        lora_adapter.path,
        dest,
        dtype=config.dtype,
        max_shard_size=config.max_shard_size,
        trust_remote_code=base_model.trust_remote_code,
        verify=verify,
        log=context.log.info,
        record={
            "merged_id": mid,
            "adapter_id": lora_adapter.adapter_id,
            "base_model": base_model.model,
            "base_model_fingerprint": base_model.fingerprint,
            "mlflow_run_id": lora_adapter.mlflow_run_id,
        },
    )


def _output(
    config: MergedModelConfig,
    lora_adapter: LoraAdapter,
    dest: Path,
    mid: str,
    method: str,
    record: dict,
    cache_hit: bool,
) -> Output:
    check = record["verification"]
    layers = check.get("layers", {})
    value = MergedModel(mid, lora_adapter.adapter_id, method, True, str(dest), check, lora_adapter.mlflow_run_id)
    return Output(
        value,
        metadata={
            "cache_hit": cache_hit,
            "mergeable": True,
            "method": method,
            "merged_id": mid,
            "path": MetadataValue.path(str(dest)),
            "dtype": config.dtype,
            "files": MetadataValue.json(record.get("files", [])),
            "weights_bytes": sum(p.stat().st_size for p in dest.glob("*.safetensors")),
            "end_of_turn_id": record.get("end_of_turn_id"),
            "layers_checked": layers.get("layers_checked"),
            "worst_ratio_to_rounding_bound": layers.get("worst_ratio_to_rounding_bound"),
            "end_to_end": check.get("end_to_end", "compared"),
            "max_abs_logit_diff": check.get("max_abs_logit_diff"),
            "max_abs_logit_diff_native": check.get("max_abs_logit_diff_native"),
            "check_precision": check.get("precision", "native"),
            "greedy_identical": check.get("greedy_identical"),
        },
    )


def _check_result(check: dict, said: str) -> AssetCheckResult:
    layers = check.get("layers", {})
    return AssetCheckResult(
        check_name="merged_matches_adapter",
        passed=bool(check["passed"]),
        severity=AssetCheckSeverity.ERROR,
        description=said,
        metadata={
            "layers_checked": layers.get("layers_checked"),
            "layer_failures": MetadataValue.json(layers.get("failures", [])),
            "worst_ratio_to_rounding_bound": layers.get("worst_ratio_to_rounding_bound"),
            "end_to_end": check.get("end_to_end", "compared"),
            "max_abs_logit_diff": check.get("max_abs_logit_diff"),
            "greedy_identical": check.get("greedy_identical"),
            "max_abs_logit_diff_native": check.get("max_abs_logit_diff_native"),
            "check_precision": check.get("precision", "native"),
            "prompts": check.get("prompts"),
            "tolerance": check.get("tolerance"),
        },
    )


def describe_check(check: dict) -> str:
    """One line for the log and the asset check: the layer-wise proof, then the end-to-end comparison."""
    layers = check.get("layers", {})
    parts = [
        f"{layers.get('layers_checked', 0)} adapted layers checked in float64 (worst "
        f"{layers.get('worst_ratio_to_rounding_bound', 0):.2f}x "
        f"the rounding bound)" + (f"; FAILED: {'; '.join(layers['failures'][:3])}" if layers.get("failures") else "")
    ]
    if check.get("max_abs_logit_diff") is not None:
        parts.append(
            f"end to end: max |Δlogit| {check['max_abs_logit_diff']:.2e} in {check.get('precision', 'native')} "
            f"(tolerance {check['tolerance']:.0e}), greedy answers identical on {check['prompts']} prompts: "
            f"{check['greedy_identical']}" + (f" ({check['first_mismatch']})" if check.get("first_mismatch") else "")
        )
    else:
        parts.append(f"end to end: {check.get('end_to_end', 'not compared')}")
    return "; ".join(parts)


def _not_mergeable(context, method: str, mid: str, lora_adapter: LoraAdapter, base_model: BaseModelInfo):
    reason = (
        f"{method} cannot be merged into the base weights: it adds virtual tokens, not weight updates, so it "
        f"is served as adapter + base (registered_model logs both)"
    )
    context.log.info(reason)
    yield Output(
        MergedModel(
            merged_id=mid,
            adapter_id=lora_adapter.adapter_id,
            method=method,
            mergeable=False,
            path=None,
            verification={"passed": True, "applicable": False, "reason": reason},
            mlflow_run_id=lora_adapter.mlflow_run_id,
            reason=reason,
            adapter_path=lora_adapter.path,
            base_model_path=base_model.path,
        ),
        metadata={
            "mergeable": False,
            "method": method,
            "reason": reason,
            "merged_id": mid,
            "adapter_path": MetadataValue.path(lora_adapter.path),
        },
    )
    yield AssetCheckResult(
        check_name="merged_matches_adapter",
        passed=True,
        severity=AssetCheckSeverity.WARN,
        description=f"not applicable: {reason}",
        metadata={"applicable": False, "method": method},
    )
