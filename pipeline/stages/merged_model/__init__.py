"""Stage (asset ``merged_model``): merge the adapter into a full-precision copy of the base weights.

The export is a plain Hugging Face folder (safetensors weights, sharded when large; config;
tokenizer with its chat template; a generation config whose end-of-sequence id is the
end-of-turn token) that ``AutoModelForCausalLM.from_pretrained`` loads without peft, and that
vLLM or TGI would serve. It is written to a temporary folder and renamed into place.

``compare_with_adapter`` is the check users most often wish they had run (the merged model
answering differently from the adapter): logits on a handful of prompts and the adapter's greedy
answers to them within a tolerance, and the same greedy choice at every answer token.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipeline.core.atomic import atomic_dir
from pipeline.stages.lora_adapter.weights import exact_lora_weight, is_plain_lora
from pipeline.stages.merged_model.record import EXPORT_RECORD, ExportError, read_export_record
from pipeline.stages.merged_model.streamed import merge_streamed, verify_layers

__all__ = [
    "EXPORT_RECORD",
    "ExportError",
    "MergeComparison",
    "compare_with_adapter",
    "load_merged",
    "merge_adapter",
    "merge_exact",
    "merge_streamed",
    "read_export_record",
    "teacher_forced",
    "verify_layers",
]

DEFAULT_TOLERANCE = 1e-4  # end to end in float64
NATIVE_TOLERANCE = 1e-3  # end to end in fp32: its own rounding is ~1e-4 on SmolLM2 (logits up to ~40)


class MergeSettings(BaseModel):
    """The merged copy's weights and the check that it matches the adapter (asset ``merged_model``)."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights of the merged copy (never quantized)"
    )
    max_shard_size: str = Field("2GB", description="safetensors shard size")
    check_prompts: int = Field(4, gt=0, description="Eval prompts the merge check runs")
    check_max_new_tokens: int = Field(
        32, gt=0, description="New tokens of each greedy answer compared between the merged model and the adapter"
    )
    tolerance: float | None = Field(
        None,
        gt=0,
        description="Max absolute logit difference of the end-to-end comparison "
        f"(default: {NATIVE_TOLERANCE:g} in the weights' dtype, {DEFAULT_TOLERANCE:g} in float64)",
    )
    check_precision: Literal["float64", "native"] = Field(
        "native",
        description="Arithmetic of the end-to-end logit comparison: the weights' own dtype (default; "
        "the layer-wise proof already checks every adapted layer in float64), or float64 over the weights "
        "as they are (two float64 copies of the model in memory)",
    )


def merge_adapter(
    base_path: str,
    adapter_path: str,
    dest: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
    trust_remote_code: bool = False,
    record: dict[str, Any] | None = None,
    verify=None,
    log=None,
) -> dict[str, Any]:
    """Merge and write ``dest`` atomically, one tensor at a time (:func:`merge_streamed`), then prove
    it layer by layer (:func:`verify_layers`); ``verify(tmp_folder) -> dict`` (the end-to-end
    comparison, where the models fit in memory) runs on the finished files before they are moved
    into place. Both results are stored in the export record under ``verification``.

    For a ``full`` training ``adapter_path`` holds the trained model itself: it is the export (in
    ``dtype``, with the same end-of-turn and template fixes). Prompt-learning adapters cannot be
    merged (they add virtual tokens, not weights): :class:`ExportError`."""
    method, source, config, gen, tokenizer = export_settings(base_path, adapter_path, dtype, trust_remote_code)
    info: dict[str, Any] = {
        "dtype": dtype,
        "end_of_turn_id": gen.eos_token_id,
        "base_model_path": str(base_path),
        "adapter_path": str(adapter_path),
        **(record or {}),
    }
    with atomic_dir(dest) as tmp:
        merge_info, references = merge_streamed(
            source,
            tmp,
            adapter_path=None if method == "full" else adapter_path,
            dtype=dtype,
            max_shard_size=max_shard_size,
            trust_remote_code=trust_remote_code,
            log=log,
        )
        if method == "full":
            merge_info["method"] = "full fine-tuning: the trained model is the export"
        info["merge"] = merge_info
        config.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for leftover in ("adapter_config.json", "adapter_model.safetensors"):
            if (tmp / leftover).exists():
                raise ExportError(f"merged folder {tmp} still holds {leftover}")
        layers = verify_layers(tmp, references, dtype, expected_layers=merge_info.get("linear_layers", 0))
        end_to_end = verify(tmp) if verify is not None else {"skipped": "no end-to-end comparison asked for"}
        info["verification"] = {
            **end_to_end,
            "layers": layers,
            "passed": bool(layers["passed"] and end_to_end.get("passed", True)),
        }
        info["files"] = sorted(p.name for p in tmp.iterdir()) + [EXPORT_RECORD]
        (tmp / EXPORT_RECORD).write_text(json.dumps(info, ensure_ascii=False, indent=2))
    return info


def export_settings(base_path: str, adapter_path: str, dtype: str, trust_remote_code: bool):
    """What the export is made from and carries, checked first: (method, the weights' source folder,
    its config, a generation config that stops at the end-of-turn token, the adapter's tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from pipeline.stages.base_model import check_adapter_folder
    from pipeline.stages.lora_adapter.methods import MERGEABLE
    from pipeline.stages.lora_adapter.spec import trained_method
    from pipeline.stages.tokenized_dataset import end_of_turn_id, pad_token_id

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"merge dtype must be float32, bfloat16 or float16 (never quantized), not {dtype!r}")
    method = trained_method(adapter_path)
    if method != "full" and method not in MERGEABLE:
        raise ExportError(
            f"a {method} adapter cannot be merged into the base weights (it adds virtual tokens, not weight updates): "
            "serve it as adapter + base"
        )
    source = adapter_path if method == "full" else base_path
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ExportError(f"{source} holds quantized weights: merge onto a 16- or 32-bit copy of the base model")
    if method != "full":
        check_adapter_folder(adapter_path)
    tokenizer = AutoTokenizer.from_pretrained(adapter_path, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError(f"the adapter's tokenizer in {adapter_path} has no chat template")
    eot = end_of_turn_id(tokenizer)
    pad = pad_token_id(tokenizer, eot)
    config.eos_token_id, config.pad_token_id, config.dtype = eot, pad, dtype
    gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id, gen.do_sample = (
        eot,
        pad,
        getattr(config, "bos_token_id", None),
        False,
    )
    return method, source, config, gen, tokenizer


def merge_exact(peft_model):
    """Merge every LoRA layer as ``W + scaling * B @ A`` computed in float64 and rounded once to the
    weight's dtype, then drop the LoRA modules; returns ``(model, info)``.

    peft's ``merge_and_unload`` forms the update in the weight's own precision and adds it there,
    rounding twice, which alone moves the merged model's logits further from the adapter model's
    than fp32 arithmetic's own noise; a correctly rounded merge stays within that noise. Layers
    this does not cover (DoRA, AdaLoRA, LoHa, LoKr, IA3, embeddings, convolutions, fan-in-fan-out)
    use their own peft merge."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    exact = peft_merged = 0
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer) or module.merged:
            continue
        for name in module.active_adapters:
            if not is_plain_lora(module, name):
                module.merge(adapter_names=[name])
                peft_merged += 1
                continue
            merged = exact_lora_weight(module, name)
            with torch.no_grad():
                module.get_base_layer().weight.copy_(merged)
            exact += 1
    model = peft_model.unload()  # the base layers now hold the merged weights
    return model, {"method": "float64, rounded once", "layers_exact": exact, "layers_peft": peft_merged}


@dataclass
class MergeComparison:
    prompts: int
    max_abs_logit_diff: float  # in ``precision``: what the check decides on
    greedy_identical: bool  # the same greedy choice at every answer token, the models as they are (as served)
    tolerance: float
    first_mismatch: str | None = None
    precision: str = "float64"
    max_abs_logit_diff_native: float | None = None  # the same comparison computed in the weights' own dtype

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.greedy_identical

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def teacher_forced(
    adapter_model, merged_model, sequences: list[list[int]], answer_starts: list[int]
) -> tuple[float, tuple | None]:
    """Both models over the sequences (prompt and greedy answer), one batched forward each: the
    largest absolute logit difference at any position, and the first answer position where the two
    models' greedy choices (argmax) differ as ``(sequence, answer token, adapter's, merged's)``, or
    None. The same choice at every position of a greedy path is what identical greedy answers means:
    each answer token is chosen from the logits after the tokens before it. The batch is padded on
    the right, which no real position sees (causal attention, positions counted from the start)."""
    import torch

    lengths = [len(ids) for ids in sequences]
    width = max(lengths)
    batch = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in sequences])
    worst, mismatch = 0.0, None
    with torch.no_grad():
        a_all = adapter_model(input_ids=batch.to(adapter_model.device)).logits.cpu()
        m_all = merged_model(input_ids=batch.to(merged_model.device)).logits.cpu()
    for n, (length, start) in enumerate(zip(lengths, answer_starts)):
        a, m = a_all[n, :length].double(), m_all[n, :length].double()
        worst = max(worst, float((a - m).abs().max()))
        # the choice of each answer token, and of the one after the answer (its stop or its next)
        ca, cm = a[start - 1 :].argmax(-1), m[start - 1 :].argmax(-1)
        if mismatch is None and not torch.equal(ca, cm):
            k = int((ca != cm).nonzero()[0])
            mismatch = (n, k, int(ca[k]), int(cm[k]))
    return worst, mismatch


def compare_with_adapter(
    adapter_model,
    merged_model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    tolerance: float = DEFAULT_TOLERANCE,
    precision: str = "float64",
) -> MergeComparison:
    """Max absolute logit difference between the adapter model and the merged model, and whether
    their greedy answers are the same: the merged model answers each prompt greedily, then both
    models read prompts and answers in one batched forward each (:func:`teacher_forced`): the
    logits compared at every position, prompt and answer, and the greedy choice at every answer
    position (one generation instead of two, one forward instead of one per prompt).

    ``precision="float64"`` (default) evaluates both models' weights, exactly as they are (the
    fp32 base and adapter, the merged fp32 files), in float64 arithmetic, so the figure measures
    the merge and not the rounding noise of fp32 arithmetic, which is itself of the order of a
    correct merge's difference (docs/evaluation-and-export.md). The fp32
    figure is kept as ``max_abs_logit_diff_native``. ``precision="native"`` decides on that one.
    The greedy choices are compared in the weights' own dtype (the models as served)."""
    import torch

    from pipeline.stages.lora_adapter.generation import generate_greedy, stop_token_ids

    if precision not in ("float64", "native"):
        raise ValueError(f"precision must be float64 or native, not {precision!r}")
    adapter_model.eval()
    merged_model.eval()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # the path: the merged model's greedy answers (a plain model decodes faster than one with its
    # adapter beside the weights); the same choices all along it make it the adapter's greedy path too
    answers = generate_greedy(
        merged_model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_token_ids(tokenizer),
        batch_size=len(prompts),
    )
    sequences, starts = [e + a for e, a in zip(encoded, answers)], [len(e) for e in encoded]
    native, mismatch = teacher_forced(adapter_model, merged_model, sequences, starts)
    worst = native
    if precision == "float64":
        dtypes = (adapter_model.dtype, merged_model.dtype)
        try:
            adapter_model.to(torch.float64)
            merged_model.to(torch.float64)
            worst, _ = teacher_forced(adapter_model, merged_model, sequences, starts)
        finally:  # back to the weights' own dtype, exactly (every value came from it)
            adapter_model.to(dtypes[0])
            merged_model.to(dtypes[1])
    first = None
    if mismatch is not None:
        n, k, a, m = mismatch
        first = (
            f"prompt {n}, answer token {k}: after {tokenizer.decode(answers[n][:k])!r} "
            f"the adapter chooses {tokenizer.decode([a])!r}, the merged model {tokenizer.decode([m])!r}"
        )
    return MergeComparison(len(prompts), worst, mismatch is None, tolerance, first, precision, native)


def load_merged(folder: str | os.PathLike, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.stages.lora_adapter.generation import inference_device

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(inference_device())
