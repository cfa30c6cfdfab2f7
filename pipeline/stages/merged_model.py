"""Stage (asset ``merged_model``): merge the adapter into a full-precision copy of the base weights.

The export is a plain Hugging Face folder (safetensors weights, sharded when large; config;
tokenizer with its chat template; a generation config whose end-of-sequence id is the
end-of-turn token) that ``AutoModelForCausalLM.from_pretrained`` loads without peft, and that
vLLM or TGI would serve. It is written to a temporary folder and renamed into place.

``compare_with_adapter`` is the check users most often wish they had run (the merged model
answering differently from the adapter): logits on a handful of prompts within a tolerance (fp32),
and identical greedy answers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_dir

EXPORT_RECORD = "medtune_export.json"
DEFAULT_TOLERANCE = 1e-4  # end to end in float64
NATIVE_TOLERANCE = 1e-3  # end to end in fp32: its own rounding is ~1e-4 on SmolLM2 (logits up to ~40)


class ExportError(RuntimeError):
    pass


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
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from pipeline.stages.base_model import check_adapter_folder
    from pipeline.stages.lora_adapter.inference import trained_method
    from pipeline.stages.lora_adapter.methods import MERGEABLE
    from pipeline.stages.tokenized_dataset import end_of_turn_id, pad_token_id

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"merge dtype must be float32, bfloat16 or float16 (never quantized), not {dtype!r}")
    method = trained_method(adapter_path)
    if method != "full" and method not in MERGEABLE:
        raise ExportError(f"a {method} adapter cannot be merged into the base weights (it adds virtual tokens, not "
                          f"weight updates): serve it as adapter + base")
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
    config.eos_token_id = eot
    config.pad_token_id = pad
    config.dtype = dtype
    gen = GenerationConfig.from_model_config(config)
    gen.eos_token_id = eot
    gen.pad_token_id = pad
    gen.bos_token_id = getattr(config, "bos_token_id", None)
    gen.do_sample = False

    info: dict[str, Any] = {"dtype": dtype, "end_of_turn_id": eot, "base_model_path": str(base_path),
                            "adapter_path": str(adapter_path), **(record or {})}
    with atomic_dir(dest) as tmp:
        merge_info, references = merge_streamed(source, tmp, adapter_path=None if method == "full" else adapter_path, dtype=dtype,
                                                max_shard_size=max_shard_size, trust_remote_code=trust_remote_code, log=log)
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
        info["verification"] = {**end_to_end, "layers": layers,
                                "passed": bool(layers["passed"] and end_to_end.get("passed", True))}
        info["files"] = sorted(p.name for p in tmp.iterdir()) + [EXPORT_RECORD]
        (tmp / EXPORT_RECORD).write_text(json.dumps(info, ensure_ascii=False, indent=2))
    return info


def is_plain_lora(module, name: str) -> bool:
    """A LoRA layer whose delta is ``scaling · B @ A`` on a ``Linear`` (not DoRA, AdaLoRA, fan-in-fan-out)."""
    import torch
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.lora import LoraLayer

    return (isinstance(module, LoraLayer) and not isinstance(module, AdaLoraLayer) and name in module.lora_A
            and isinstance(module.get_base_layer(), torch.nn.Linear) and not module.use_dora.get(name, False)
            and not getattr(module, "fan_in_fan_out", False) and not getattr(module, "lora_bias", {}).get(name, False))


def exact_lora_weight(module, name: str):
    """``W + scaling · B @ A`` computed in float64 and rounded once to ``W``'s dtype (a new tensor)."""
    import torch

    weight = module.get_base_layer().weight.detach()
    a = module.lora_A[name].weight.detach().to(weight.device, torch.float64)
    b = module.lora_B[name].weight.detach().to(weight.device, torch.float64)
    return (weight.to(torch.float64) + (b @ a) * float(module.scaling[name])).to(weight.dtype)


def merge_exact(peft_model):
    """Merge every LoRA layer as ``W + scaling * B @ A`` computed in float64 and rounded once to the
    weight's dtype, then drop the LoRA modules; returns ``(model, info)``.

    peft's ``merge_and_unload`` forms the update in the weight's own precision and adds it there,
    rounding twice; measured on SmolLM2-135M (logits up to ~40) that alone moved the merged model's
    logits 1.4e-4 from the adapter model's, while the correctly rounded merge is 9.1e-5 away, the
    same order as the fp32 adapter model's own distance from an fp64 computation (6.9e-5). Layers
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


# ------------------------------------------------------------------ merge one tensor at a time

@dataclass
class LayerReference:
    """What an adapted layer must compute, found before the merge: the adapter model's own forward
    (peft's, unmerged, in float64 over the base weight as stored) on seeded random inputs."""

    key: str  # the weight's name in the safetensors files
    inputs: Any  # (k, in_features) float64
    outputs: Any  # (k, out_features) float64, bias left out


def load_adapter_skeleton(base_path: str, adapter_path: str, trust_remote_code: bool = False):
    """The adapter over a base model with no weights (meta tensors): peft's layer structure and the
    adapter's own weights, real and on the CPU, and nothing of the base's. Returns the PeftModel."""
    import torch
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    peft_config = PeftConfig.from_pretrained(adapter_path)
    if getattr(peft_config, "modules_to_save", None):
        raise ExportError(f"{adapter_path} trains whole modules too ({peft_config.modules_to_save}): not supported by the streamed merge")
    if peft_config.peft_type.value == "ADALORA":
        # peft resizes AdaLoRA's ranks from data on load, which meta tensors cannot do: a skeleton with
        # (random, never read) weights in memory, so this method's merge is not bounded by one tensor
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(skeleton, adapter_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model = PeftModel(skeleton, peft_config, low_cpu_mem_usage=True)
    saved = load_peft_weights(str(adapter_path), device="cpu")
    assigned, used = {}, set()
    for name, param in model.named_parameters():
        if ".default" not in name:
            continue
        key = name.replace(".default", "")
        key = key if key in saved else key.removesuffix(".weight")
        if key not in saved:
            raise ExportError(f"{adapter_path} has no weights for {name}")
        assigned[name] = saved[key]
        used.add(key)
    if set(saved) - used:
        raise ExportError(f"{adapter_path} holds weights no adapted layer takes: {sorted(set(saved) - used)[:5]}")
    model.load_state_dict(assigned, strict=False, assign=True)
    return model


def adapted_layers(peft_model) -> dict[str, Any]:
    """Weight name in the base's files -> the peft layer that adapts it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {f"{name.removeprefix('base_model.model.')}.weight": module for name, module in peft_model.named_modules()
            if isinstance(module, BaseTunerLayer)}


def _merge_layer(module, weight, seed: int, probes: int):
    """Float64 merge of one adapted layer over its stored base weight, by the method's own peft
    code; before merging, the reference outputs of its unmerged forward on random inputs."""
    import torch

    base_layer = module.get_base_layer()
    own = [(param, param.dtype) for name, param in module.named_parameters() if not name.startswith("base_layer")]
    for param, _ in own:
        param.data = param.data.to(torch.float64)
    base_layer.weight = torch.nn.Parameter(weight.to(torch.float64), requires_grad=False)  # no copy when float64 already
    bias = getattr(base_layer, "bias", None)
    if bias is not None:
        base_layer.bias = None  # the merge leaves the bias as it is; the proof compares weights' products
    reference = None
    if isinstance(base_layer, torch.nn.Linear):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((probes, base_layer.in_features), generator=g, dtype=torch.float64)
        with torch.no_grad():
            reference = (x, module(x))
    module.merge(adapter_names=list(module.active_adapters))
    merged = base_layer.weight.data
    base_layer.weight = torch.nn.Parameter(torch.empty(merged.shape, device="meta"), requires_grad=False)
    if bias is not None:
        base_layer.bias = bias
    for param, dtype in own:  # the layer is done: its float64 copies go
        param.data = param.data.to(dtype)
    return merged, reference


ROW_CHUNK = 1024  # rows of a weight converted to float64 at a time (a few MB: stays in the CPU's caches)


def _merge_plain_lora(module, name: str, weight, out_dtype, seed: int, probes: int):
    """A plain LoRA layer (:func:`is_plain_lora`) merged ``ROW_CHUNK`` rows at a time: each block of
    the stored weight in float64 plus ``(B[rows] @ A) · scaling`` (peft's ``get_delta_weight``, in
    its order of operations), rounded once to ``out_dtype``. The reference outputs are the stored
    weight's product plus peft's own adapter branch (``lora_B(lora_A(x)) · scaling``, float64). Memory:
    the output tensor and one block, never the layer in float64."""
    import torch

    a = module.lora_A[name].weight.detach().to(torch.float64)
    b = module.lora_B[name].weight.detach().to(torch.float64)
    scaling = float(module.scaling[name])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((probes, weight.shape[1]), generator=g, dtype=torch.float64)
    with torch.no_grad():
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        dtypes = (lora_a.weight.dtype, lora_b.weight.dtype)
        lora_a.to(torch.float64), lora_b.to(torch.float64)
        outputs = lora_b(lora_a(x)) * scaling
        lora_a.to(dtypes[0]), lora_b.to(dtypes[1])
    merged = torch.empty(weight.shape, dtype=out_dtype)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        block = weight[rows].to(torch.float64)
        outputs[:, rows] += x @ block.T
        block += (b[rows] @ a) * scaling
        merged[rows] = block.to(out_dtype)
    return merged, (x, outputs)


def merge_streamed(source_path: str, dest: str | os.PathLike, *, adapter_path: str | None, dtype: str = "float32",
                   max_shard_size: str = "2GB", trust_remote_code: bool = False, probes: int = 2, log=None) -> tuple[dict[str, Any], list[LayerReference]]:
    """Write ``source_path``'s weights into ``dest`` one tensor at a time, in ``dtype``, each adapted
    layer's weight replaced by its float64 merge (peft's own delta for the method, rounded once).
    Peak memory: about one tensor in float64 plus the adapter, whatever the base's size. Returns
    the merge's record and each adapted layer's reference (:func:`verify_layers`)."""
    import time

    import torch

    from pipeline.core.safetensors_stream import FolderReader, FolderWriter, release_memory

    out_dtype = getattr(torch, dtype)
    reader = FolderReader(source_path)
    layers = adapted_layers(load_adapter_skeleton(source_path, adapter_path, trust_remote_code)) if adapter_path else {}
    missing = sorted(set(layers) - set(reader.names()))
    if missing:
        raise ExportError(f"the base in {source_path} has no weights named {missing[:3]} for the adapter's layers")
    plan = []
    for name in reader.names():
        src_dtype, shape = reader.meta(name)
        plan.append((name, out_dtype if src_dtype.is_floating_point else src_dtype, shape))
    writer = FolderWriter(dest, plan, max_shard_size)
    references: list[LayerReference] = []
    start, last = time.perf_counter(), 0.0
    for k, name in enumerate(writer.order):
        tensor = reader.get(name)
        module = layers.get(name)
        if module is not None and len(module.active_adapters) == 1 and is_plain_lora(module, module.active_adapters[0]):
            merged, ref = _merge_plain_lora(module, module.active_adapters[0], tensor, plan[k][1], seed=k, probes=probes)
        elif module is not None:
            weight = tensor.to(torch.float64)
            del tensor  # the stored copy is not needed beside the float64 one
            merged, ref = _merge_layer(module, weight, seed=k, probes=probes)
            del weight
        if module is not None:
            if ref is not None:
                references.append(LayerReference(name, ref[0], ref[1]))
            tensor = merged
        writer.write(name, tensor.to(plan[k][1]))
        del tensor
        release_memory()
        if log and (time.perf_counter() - last > 10 or k + 1 == len(writer.order)):
            last = time.perf_counter()
            done = reader.bytes_read + writer.bytes_written
            log(f"merge: {k + 1}/{len(writer.order)} tensors, {reader.bytes_read / 1e9:.2f} GB read, "
                f"{writer.bytes_written / 1e9:.2f} GB written, {done / 1e6 / max(last - start, 1e-9):.0f} MB/s")
    files = writer.close()
    info = {"method": "streamed, one tensor at a time; float64, rounded once" if layers else "streamed copy",
            "layers_merged": len(layers), "linear_layers": len(references), "tensors": len(writer.order), "weight_files": files,
            "bytes_read": reader.bytes_read, "bytes_written": writer.bytes_written}
    return info, references


def verify_layers(folder: str | os.PathLike, references: list[LayerReference], dtype: str, expected_layers: int | None = None) -> dict[str, Any]:
    """The merged files against the adapter, layer by layer, exactly: for each adapted layer, the
    merged weight as written (read back, in float64) times the reference's random inputs must equal
    the adapter model's own outputs up to the rounding of the weights to ``dtype`` (each product
    within ``eps(dtype) · |x|·|W|``, twice the worst case of rounding each weight once). A scaled
    delta, a missing layer or a transposed delta is far outside it in float32; in 16-bit a delta
    smaller than the weights' own rounding is, by construction, not representable."""
    import torch

    from pipeline.core.safetensors_stream import FolderReader, release_memory

    reader = FolderReader(folder)
    eps = torch.finfo(getattr(torch, dtype)).eps
    worst, worst_layer, failures = 0.0, None, []
    for ref in references:
        if ref.key not in reader.entries:
            failures.append(f"{ref.key}: missing from the merged files")
            continue
        w = reader.get(ref.key)
        if list(w.shape) != [ref.outputs.shape[1], ref.inputs.shape[1]]:
            failures.append(f"{ref.key}: shape {list(w.shape)}, expected {[ref.outputs.shape[1], ref.inputs.shape[1]]}")
            continue
        got = torch.empty_like(ref.outputs)
        bound = torch.empty_like(ref.outputs)
        for start in range(0, w.shape[0], ROW_CHUNK):  # a block of rows in float64 at a time
            rows = slice(start, start + ROW_CHUNK)
            block = w[rows].to(torch.float64)
            got[:, rows] = ref.inputs @ block.T
            bound[:, rows] = ref.inputs.abs() @ block.abs_().T
        bound = eps * bound + 1e-12
        ratio = float(((got - ref.outputs).abs() / bound).max())
        if ratio > worst:
            worst, worst_layer = ratio, ref.key
        if ratio > 1.0:
            failures.append(f"{ref.key}: merged weight off by {ratio:.3g}x the rounding bound")
        del w, got, bound
        release_memory()
    if expected_layers is not None and len(references) != expected_layers:
        failures.append(f"{len(references)} layers checked, the adapter adapts {expected_layers}")
    return {"layers_checked": len(references), "worst_ratio_to_rounding_bound": worst, "worst_layer": worst_layer,
            "failures": failures[:20], "passed": not failures and (bool(references) or expected_layers == 0)}


def fits_in_memory(folder: str | os.PathLike, copies: int = 2, dtype_bytes: int = 4) -> tuple[bool, str]:
    """Whether ``copies`` models of ``folder``'s size (in ``dtype_bytes`` per value) fit in half the
    memory available now."""
    from pipeline.core.safetensors_stream import FolderReader

    reader = FolderReader(folder)
    values = 0
    for name in reader.names():
        _, shape = reader.meta(name)
        n = 1
        for d in shape:
            n *= d
        values += n
    need = values * dtype_bytes * copies
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    ok = available > 0 and need <= available / 2
    return ok, f"needs about {need / 1e9:.1f} GB for {copies} models, {available / 1e9:.1f} GB available"


def read_export_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / EXPORT_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class MergeComparison:
    prompts: int
    max_abs_logit_diff: float  # in ``precision``: what the check decides on
    greedy_identical: bool  # greedy answers of the models as they are (as served)
    tolerance: float
    first_mismatch: str | None = None
    precision: str = "float64"
    max_abs_logit_diff_native: float | None = None  # the same comparison computed in the weights' own dtype

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.greedy_identical

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _max_logit_diff(adapter_model, merged_model, tokenizer, prompts: list[str]) -> float:
    import torch

    worst = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            a = adapter_model(input_ids=ids.to(adapter_model.device)).logits.double().cpu()
            m = merged_model(input_ids=ids.to(merged_model.device)).logits.double().cpu()
            worst = max(worst, float((a - m).abs().max()))
    return worst


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
    """Max absolute logit difference between the adapter model and the merged model on each
    prompt, and their greedy answers.

    ``precision="float64"`` (default) evaluates both models' weights, exactly as they are (the
    fp32 base and adapter, the merged fp32 files), in float64 arithmetic, so the figure measures
    the merge and not the rounding noise of fp32 arithmetic, which on SmolLM2-135M (logits up to
    ~40) is itself about 1e-4 between two fp32 computations of the same function (measured 9.1e-5
    and 1.28e-4 for two correct merges, whose float64 figures were 1.8e-5 and below). The fp32
    figure is kept as ``max_abs_logit_diff_native``. ``precision="native"`` decides on that one."""
    import torch

    from pipeline.stages.evaluation_report import generate_greedy, stop_token_ids

    if precision not in ("float64", "native"):
        raise ValueError(f"precision must be float64 or native, not {precision!r}")
    adapter_model.eval()
    merged_model.eval()
    stops = stop_token_ids(tokenizer)
    ga = generate_greedy(adapter_model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stops, batch_size=1)
    gm = generate_greedy(merged_model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stops, batch_size=1)
    native = _max_logit_diff(adapter_model, merged_model, tokenizer, prompts)
    worst = native
    if precision == "float64":
        dtypes = (adapter_model.dtype, merged_model.dtype)
        try:
            adapter_model.to(torch.float64)
            merged_model.to(torch.float64)
            worst = _max_logit_diff(adapter_model, merged_model, tokenizer, prompts)
        finally:  # back to the weights' own dtype, exactly (every value came from it)
            adapter_model.to(dtypes[0])
            merged_model.to(dtypes[1])
    mismatch = next((i for i, (x, y) in enumerate(zip(ga, gm)) if x != y), None)
    first = None
    if mismatch is not None:
        first = (f"prompt {mismatch}: adapter {tokenizer.decode(ga[mismatch])!r} vs merged "
                 f"{tokenizer.decode(gm[mismatch])!r}")
    return MergeComparison(len(prompts), worst, mismatch is None, tolerance, first, precision, native)


def load_merged(folder: str | os.PathLike, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.stages.evaluation_report import inference_device

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(inference_device())
