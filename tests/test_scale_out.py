"""QLoRA and multi-GPU presets, and the presets' agreement with the code: what needs a GPU is
refused on CPU with a message that says so (and the GPU-only runs are skipped with that reason);
what can be checked here is (configs load, launch commands, preset settings)."""

import pytest
import torch
import yaml
from dagster import validate_run_config

from pipeline.stages.lora_adapter.distributed import LaunchError, check_accelerate_config, preset_names, preset_path
from pipeline.stages.lora_adapter.methods import MethodError, quantization_config
from pipeline.stages.lora_adapter.spec import TrainSpec

ON_GPU = torch.cuda.is_available()


def spec(**kw) -> TrainSpec:
    return TrainSpec(base_model_path="", tokenized_path="", output_dir="", checkpoint_dir="", **kw)


def test_the_accelerate_presets_load_and_name_their_strategy():
    assert preset_names() == ["deepspeed-zero2", "deepspeed-zero3", "fsdp"]
    kinds = {n: check_accelerate_config(preset_path(n), on_gpu=True, deepspeed_installed=True) for n in preset_names()}
    assert kinds == {"deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED", "fsdp": "FSDP"}
    stages = {
        n: yaml.safe_load(preset_path(n).read_text()).get("deepspeed_config", {}).get("zero_stage")
        for n in preset_names()
    }
    assert stages == {"deepspeed-zero2": 2, "deepspeed-zero3": 3, "fsdp": None}
    assert preset_path("../fsdp") is None and preset_path("nope") is None


def test_fsdp_and_deepspeed_are_refused_without_a_gpu_saying_why(tmp_path):
    with pytest.raises(LaunchError, match="uses FSDP, which needs GPUs; this machine has none.*DDP"):
        check_accelerate_config(preset_path("fsdp"), on_gpu=False)
    with pytest.raises(LaunchError, match="pip install deepspeed"):
        check_accelerate_config(preset_path("deepspeed-zero3"), on_gpu=True, deepspeed_installed=False)
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [not, a, type]\n")
    with pytest.raises(LaunchError, match="does not load|unknown distributed_type"):
        check_accelerate_config(broken, on_gpu=True)


def test_an_accelerate_preset_launches_through_accelerate_with_its_file():
    from assets.lora_adapter import LoraAdapterConfig, launch_command

    config = LoraAdapterConfig(num_processes=4, accelerate_config=str(preset_path("fsdp")))
    cmd = launch_command(__import__("pathlib").Path("/tmp/spec.json"), config, run_id="x")
    assert cmd[0].endswith("accelerate") and cmd[1:4] == ["launch", "--num_processes", "4"]
    assert cmd[4:6] == ["--config_file", str(preset_path("fsdp"))]
    assert cmd[-4:] == ["-m", "pipeline.stages.lora_adapter", "--spec", "/tmp/spec.json"]


def test_qlora_is_refused_on_cpu_and_for_methods_it_does_not_apply_to():
    assert quantization_config(spec(), "bf16", on_gpu=False) is None
    with pytest.raises(MethodError, match=r"nf4 \(QLoRA\) needs a CUDA GPU"):
        quantization_config(spec(quantization="nf4"), "bf16", on_gpu=False)
    with pytest.raises(MethodError, match="not prefix_tuning"):
        quantization_config(spec(quantization="nf4", method="prefix_tuning"), "bf16", on_gpu=True)
    with pytest.raises(MethodError, match="unknown quantization"):
        quantization_config(
            TrainSpec.model_construct(**{**spec().model_dump(), "quantization": "int3"}), "bf16", on_gpu=True
        )


@pytest.mark.skipif(
    not ON_GPU, reason="QLoRA's 4-bit NF4 base needs a CUDA GPU and bitsandbytes (none on this machine)"
)
def test_qlora_loads_a_4bit_base_on_gpu(tiny_model_dir):
    from pipeline.stages.lora_adapter.model import load_for_training

    model, _, _ = load_for_training(
        spec(base_model_path=str(tiny_model_dir), quantization="nf4", r=8, lora_alpha=16), "bf16", True
    )
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)


def test_every_preset_validates_and_cpu_demo_spells_out_the_defaults():
    from assets.lora_adapter import LoraAdapterConfig
    from pipeline.definitions import defs
    from pipeline.ops.jobs import PRESETS, load_preset
    from pipeline.ops.sweep import config_for
    from pipeline.stages.sweep_plan import expand

    job = defs.resolve_job_def("full_pipeline_job")
    for name in PRESETS:
        validate_run_config(job, load_preset(name))
    demo = load_preset("cpu-demo")["ops"]["lora_adapter"]["config"]
    defaults = LoraAdapterConfig()
    assert {k: v for k, v in demo.items()} == {k: getattr(defaults, k) for k in demo}
    qlora = load_preset("gpu-qwen2.5-1.5b-qlora")["ops"]
    assert (
        qlora["lora_adapter"]["config"]["quantization"] == "nf4"
        and qlora["merged_model"]["config"]["dtype"] == "float32"
    )
    plan_job = defs.resolve_job_def("sweep_plan_job")
    for name in ("sweep-cpu", "sweep-gpu-qwen2.5-1.5b"):
        config = load_preset(name)
        validate_run_config(plan_job, config_for(plan_job, config))
        c = config["ops"]["sweep_plan"]["config"]
        trials = expand(c.get("base", {}), c.get("grid", {}), c.get("trials", []), c.get("per_method", {}))
        for t in trials:
            LoraAdapterConfig(**t.settings)
    cpu = load_preset("sweep-cpu")["ops"]["sweep_plan"]["config"]
    methods = {
        t.settings.get("method") for t in expand(cpu["base"], cpu.get("grid", {}), cpu["trials"], cpu["per_method"])
    }
    from pipeline.stages.lora_adapter.methods import METHODS

    assert methods == set(METHODS)  # sweep-cpu measures every method (the README's methods table)
