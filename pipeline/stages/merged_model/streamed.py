"""The merge one tensor at a time, and its layer-by-layer proof (part of the ``merged_model`` stage).

``merge_streamed`` writes a base's weights into a new folder a tensor at a time, each adapted
layer's weight replaced by its float64 merge rounded once; ``verify_layers`` reads the written
files back and checks every adapted layer against the adapter model's own outputs on random
inputs, in float64. Peak memory: about the largest tensor plus the adapter, whatever the base's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.lora_adapter.weights import is_plain_lora
from pipeline.stages.merged_model.record import ExportError


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
        raise ExportError(
            f"{adapter_path} trains whole modules too ({peft_config.modules_to_save}): not supported by the "
            "streamed merge"
        )
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
    for name, _ in model.named_parameters():
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

    return {
        f"{name.removeprefix('base_model.model.')}.weight": module
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def _merge_layer(module, weight, seed: int, probes: int):
    """Float64 merge of one adapted layer over its stored base weight, by the method's own peft
    code; before merging, the reference outputs of its unmerged forward on random inputs."""
    import torch

    base_layer = module.get_base_layer()
    own = [(param, param.dtype) for name, param in module.named_parameters() if not name.startswith("base_layer")]
    for param, _ in own:
        param.data = param.data.to(torch.float64)
    base_layer.weight = torch.nn.Parameter(
        weight.to(torch.float64), requires_grad=False
    )  # no copy when float64 already
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


def merge_streamed(
    source_path: str,
    dest: str | os.PathLike,
    *,
    adapter_path: str | None,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
    trust_remote_code: bool = False,
    probes: int = 2,
    log=None,
) -> tuple[dict[str, Any], list[LayerReference]]:
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
            merged, ref = _merge_plain_lora(
                module, module.active_adapters[0], tensor, plan[k][1], seed=k, probes=probes
            )
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
            log(
                f"merge: {k + 1}/{len(writer.order)} tensors, {reader.bytes_read / 1e9:.2f} GB read, "
                f"{writer.bytes_written / 1e9:.2f} GB written, {done / 1e6 / max(last - start, 1e-9):.0f} MB/s"
            )
    files = writer.close()
    info = {
        "method": "streamed, one tensor at a time; float64, rounded once" if layers else "streamed copy",
        "layers_merged": len(layers),
        "linear_layers": len(references),
        "tensors": len(writer.order),
        "weight_files": files,
        "bytes_read": reader.bytes_read,
        "bytes_written": writer.bytes_written,
    }
    return info, references


def verify_layers(
    folder: str | os.PathLike, references: list[LayerReference], dtype: str, expected_layers: int | None = None
) -> dict[str, Any]:
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
    return {
        "layers_checked": len(references),
        "worst_ratio_to_rounding_bound": worst,
        "worst_layer": worst_layer,
        "failures": failures[:20],
        "passed": not failures and (bool(references) or expected_layers == 0),
    }


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
