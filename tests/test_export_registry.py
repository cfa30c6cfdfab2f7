"""merged_model's functions and the registry: a real merge passes the check and loads without
peft; a deliberately wrong one fails it; registry aliases move only when they should; the
champion loads back from MLflow and answers."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import mlflow_store
from pipeline.stages.lora_adapter.generation import load_tuned_model
from pipeline.stages.merged_model import (
    compare_with_adapter,
    load_merged,
    merge_adapter,
    merge_exact,
    read_export_record,
)
from pipeline.stages.tokenized_dataset import end_of_turn_id, render_prompt


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero (random) weights on every linear layer, and the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("merged") / "m1"
    info = merge_adapter(str(tiny_model_dir), str(adapter_dir), dest, record={"merged_id": "m1"})
    return dest, info


def _prompts(tokenizer, n=3):
    return [
        render_prompt(tokenizer, "使用中医知识正确回答适合这个病例的中成药。", f"病例{k}：咳嗽。", "系统")
        for k in range(n)
    ]


def test_merged_folder_is_a_plain_hf_model(merged, adapter_dir):
    dest, info = merged
    names = {p.name for p in dest.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "generation_config.json" in names
    assert "adapter_config.json" not in names and not any(n.endswith(".bin") for n in names)
    assert not list(dest.parent.glob(".tmp-*"))  # renamed into place, nothing left over
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dest)
    eot = end_of_turn_id(tok)
    assert tok.chat_template and json.loads((dest / "generation_config.json").read_text())["eos_token_id"] == eot
    assert json.loads((dest / "config.json").read_text())["eos_token_id"] == eot
    assert read_export_record(dest)["merged_id"] == "m1"


def test_merge_rounds_once_from_float64(tiny_model_dir, adapter_dir, merged):
    """Every merged weight is W + scaling * B @ A computed in float64 and rounded once to fp32."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    expected = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            a = module.lora_A["default"].weight.double()
            b = module.lora_B["default"].weight.double()
            w = module.get_base_layer().weight.double()
            key = name.split("base_model.model.", 1)[1] + ".weight"
            expected[key] = (w + (b @ a) * module.scaling["default"]).float()
    assert len(expected) >= 7
    model, info = merge_exact(peft_model)
    assert info["layers_exact"] == len(expected) and info["layers_peft"] == 0
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    # and that is what the export wrote
    saved = load_file(str(merged[0] / "model.safetensors"))
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    assert merged[1]["merge"]["layers_merged"] == len(expected)
    layers = merged[1]["verification"]["layers"]
    assert (
        layers["passed"]
        and layers["layers_checked"] == len(expected)
        and layers["worst_ratio_to_rounding_bound"] <= 1.0
    )


def _planted(folder, tmp_path, name, key, value):
    import shutil

    wrong = tmp_path / name
    shutil.copytree(folder, wrong)
    weights = load_file(wrong / "model.safetensors")
    if value is None:
        del weights[key]
    else:
        weights[key] = value.to(weights[key].dtype).contiguous()
    save_file(weights, wrong / "model.safetensors", metadata={"format": "pt"})
    return wrong


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_proof_catches_each_planted_wrong_merge(tiny_model_dir, adapter_dir, tmp_path, dtype):
    """The layer-by-layer proof passes a real merge (in fp32 and in bf16) and fails, naming the layer,
    on a scaled delta, a layer left as in the base, a transposed delta, and a missing tensor."""
    from pipeline.stages.merged_model import merge_streamed, verify_layers

    good = tmp_path / "good"
    good.mkdir()
    info, refs = merge_streamed(str(tiny_model_dir), good, adapter_path=str(adapter_dir), dtype=dtype)
    assert info["linear_layers"] == len(refs) >= 7
    result = verify_layers(good, refs, dtype, info["linear_layers"])
    assert result["passed"], result
    if dtype != "float32":
        return  # the plants below need a delta larger than the weights' rounding: fp32
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(good / "model.safetensors")
    key = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert merged[key].shape[0] == merged[key].shape[1]  # square: a transposed delta has the right shape
    delta = merged[key].double() - base[key].double()
    plants = {
        "scaled": base[key].double() + 2 * delta,
        "missing": base[key].double(),
        "transposed": base[key].double() + delta.T,
        "absent": None,
    }
    for name, value in plants.items():
        result = verify_layers(_planted(good, tmp_path, name, key, value), refs, dtype, info["linear_layers"])
        assert not result["passed"], name
        assert key in result["failures"][0], (name, result["failures"])


def test_a_wrong_merge_is_recorded_failed_before_anything_is_registered(
    tiny_model_dir, adapter_dir, tmp_path, monkeypatch
):
    """A merge that gets a layer wrong (here every delta doubled) is written with a failed
    verification: the blocking asset check then stops registered_model."""
    import pipeline.stages.merged_model.streamed as mm

    real, real_plain = mm._merge_layer, mm._merge_plain_lora

    def doubled(module, weight, seed, probes):
        base = weight.clone()  # the merge works in place
        merged, ref = real(module, weight, seed, probes)
        return 2 * merged - base, ref

    def doubled_plain(module, name, weight, out_dtype, seed, probes):
        merged, ref = real_plain(module, name, weight, out_dtype, seed, probes)
        return (2 * merged.double() - weight.double()).to(out_dtype), ref

    monkeypatch.setattr(mm, "_merge_layer", doubled)
    monkeypatch.setattr(mm, "_merge_plain_lora", doubled_plain)
    info = merge_adapter(str(tiny_model_dir), str(adapter_dir), tmp_path / "bad")
    assert not info["verification"]["passed"] and not info["verification"]["layers"]["passed"]
    assert read_export_record(tmp_path / "bad")["verification"]["passed"] is False


def test_streamed_merge_holds_one_tensor_at_a_time(tiny_model_dir, tmp_path):
    """The streamed reader and writer: shards planned from the names, dtypes and shapes, written a
    tensor at a time, read back equal; several shards get an index."""
    from pipeline.core.safetensors_stream import INDEX, FolderReader, FolderWriter

    reader = FolderReader(tiny_model_dir)
    plan = [(n, *reader.meta(n)) for n in reader.names()]
    writer = FolderWriter(tmp_path, plan, max_shard_size="1MB")
    for name, _, _ in plan:
        writer.write(name, reader.get(name))
    files = writer.close()
    assert len(files) > 2 and INDEX in files
    again = FolderReader(tmp_path)
    assert sorted(again.names()) == sorted(reader.names())
    assert all(torch.equal(again.get(n), reader.get(n)) for n in reader.names())
    with pytest.raises(ValueError, match="out of order"):
        FolderWriter(tmp_path / "x", plan).write(plan[1][0], reader.get(plan[1][0]))


def test_merged_model_loads_with_peft_not_installed(merged):
    dest, _ = merged
    code = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any `import peft` now fails, as if it were not installed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(dest)!r})
        m = AutoModelForCausalLM.from_pretrained({str(dest)!r}, dtype=torch.float32, use_safetensors=True)
        chat = [{{"role": "user", "content": "你好"}}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = m.generate(**ids, max_new_tokens=4, do_sample=False)
        assert "peft" not in sys.modules or sys.modules["peft"] is None
        print("OK", out.shape[1] > ids["input_ids"].shape[1])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK True" in proc.stdout


def test_merge_check_passes_on_a_real_merge(tiny_model_dir, adapter_dir, merged):
    dest, _ = merged
    adapter_model, tok = load_tuned_model(str(tiny_model_dir), str(adapter_dir))
    result = compare_with_adapter(adapter_model, load_merged(dest), tok, _prompts(tok), max_new_tokens=8)
    assert result.passed, result
    assert result.max_abs_logit_diff < 1e-4 and result.greedy_identical
    assert result.precision == "float64" and result.max_abs_logit_diff_native is not None
    assert next(adapter_model.parameters()).dtype == torch.float32  # put back after the float64 pass
    native = compare_with_adapter(
        adapter_model, load_merged(dest), tok, _prompts(tok), max_new_tokens=8, precision="native"
    )
    assert native.max_abs_logit_diff == native.max_abs_logit_diff_native < 1e-4


def test_merge_check_fails_on_a_wrong_merge(tiny_model_dir, adapter_dir, merged, tmp_path):
    """A 'merge' that forgot the adapter on one layer: the check must catch it."""
    import shutil

    dest, _ = merged
    wrong = tmp_path / "wrong"
    shutil.copytree(dest, wrong)
    weights = load_file(wrong / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = base[key].clone()  # this layer as in the base model: the LoRA delta is missing
    save_file(weights, wrong / "model.safetensors", metadata={"format": "pt"})
    adapter_model, tok = load_tuned_model(str(tiny_model_dir), str(adapter_dir))
    result = compare_with_adapter(adapter_model, load_merged(wrong), tok, _prompts(tok), max_new_tokens=8)
    assert not result.passed
    assert result.max_abs_logit_diff > 1e-4


class _FixedLogits(torch.nn.Module):
    """A stand-in model: the same logits row at every position, except where ``changes`` says."""

    device = torch.device("cpu")

    def __init__(self, vocab=8, changes=None):
        super().__init__()
        self.vocab, self.changes = vocab, changes or {}
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[..., 5] = 1.0  # token 5 is every position's greedy choice
        for pos, (token, value) in self.changes.items():
            logits[0, pos, token] = value
        return type("Out", (), {"logits": logits})()


def test_the_greedy_check_catches_a_changed_choice_that_the_logit_tolerance_misses():
    from pipeline.stages.merged_model import teacher_forced

    ids, start = [1, 2, 3, 5, 5, 5], 3  # a 3-token prompt, then a 3-token answer
    same, mismatch = teacher_forced(_FixedLogits(), _FixedLogits(), [ids], [start])
    assert same == 0.0 and mismatch is None
    # at the second answer token, token 6 just below token 5 for one model, just above it for the other:
    # a logit difference far below any tolerance, a different greedy answer
    adapter, merged = _FixedLogits(changes={start: (6, 1.0 - 1e-6)}), _FixedLogits(changes={start: (6, 1.0 + 1e-6)})
    worst, mismatch = teacher_forced(adapter, merged, [ids], [start])
    assert worst < 1e-5 and mismatch == (0, 1, 5, 6)  # prompt 0, answer token 1: adapter 5, merged 6
    # a difference in the prompt's own positions counts in the logits, not as a greedy choice
    worst, mismatch = teacher_forced(_FixedLogits(), _FixedLogits(changes={0: (6, 3.0)}), [ids], [start])
    assert worst == 3.0 and mismatch is None


def test_merge_refuses_quantized_or_odd_dtypes(tiny_model_dir, adapter_dir, tmp_path):
    from pipeline.stages.merged_model import ExportError

    with pytest.raises(ExportError, match="never quantized"):
        merge_adapter(str(tiny_model_dir), str(adapter_dir), tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_merge_verify_failure_leaves_no_output(tiny_model_dir, adapter_dir, tmp_path):
    def boom(folder):
        raise RuntimeError("verification crashed")

    with pytest.raises(RuntimeError, match="verification crashed"):
        merge_adapter(str(tiny_model_dir), str(adapter_dir), tmp_path / "m", verify=boom)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------- registry


def test_registry_aliases_move_only_when_they_should(merged, tmp_path):
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline.stages.registered_model import register_merged_model

    dest, _ = merged
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("medtune", artifact_location=(tmp_path / "artifacts").as_uri())

    def register(merged_id, score, **figures):
        run_id = client.create_run(exp).info.run_id
        client.set_terminated(run_id, "FINISHED")
        return register_merged_model(
            uri,
            name="medtune",
            merged_dir=str(dest),
            merged_id=merged_id,
            run_id=run_id,
            figures={"rouge_l": score, **figures},
            tags={"medtune.data_fingerprint": "abc"},
            system_prompt="系统",
            max_new_tokens=4,
        ), run_id

    first, run1 = register("a", 10.0)
    assert first.version == "1" and first.became_champion and first.aliases == ["challenger", "champion"]
    v1 = client.get_model_version("medtune", "1")
    assert v1.run_id == run1 and v1.tags["medtune.data_fingerprint"] == "abc"

    worse, _ = register("b", 5.0)  # lower ROUGE-L: challenger only
    assert worse.version == "2" and not worse.became_champion and worse.aliases == ["challenger"]
    assert client.get_model_version_by_alias("medtune", "champion").version in ("1", 1)

    tie, _ = register("c", 10.0)  # a tie does not beat the champion
    assert not tie.became_champion
    assert str(client.get_model_version_by_alias("medtune", "champion").version) == "1"

    better, _ = register("d", 12.5)
    assert better.version == "4" and better.became_champion and better.previous_champion == "1"
    assert str(client.get_model_version_by_alias("medtune", "champion").version) == "4"
    assert str(client.get_model_version_by_alias("medtune", "challenger").version) == "4"

    again, _ = register("b", 5.0)  # the same merged model again: its version is reused, no alias moves
    assert again.reused and again.version == "2"
    assert str(client.get_model_version_by_alias("medtune", "champion").version) == "4"
    assert str(client.get_model_version_by_alias("medtune", "challenger").version) == "4"
    assert len(client.search_model_versions("name = 'medtune'")) == 4
    # the default rule: held-out loss must not rise, then choice accuracy, then ROUGE-L
    client.set_model_version_tag("medtune", "4", "medtune.eval_loss", "1.50")
    client.set_model_version_tag("medtune", "4", "medtune.choice_accuracy", "0.10")
    learns, _ = register("e", 9.0, eval_loss=1.40, choice_accuracy=0.90)  # lower ROUGE-L, but it learnt the choice
    assert learns.became_champion and "choice_accuracy" in learns.decided_by
    description = client.get_model_version("medtune", learns.version).description
    assert "promote_on = eval_loss, choice_accuracy, rouge_l" in description and "choice_accuracy 0.9000" in description
    worse_loss, _ = register("f", 30.0, eval_loss=1.60, choice_accuracy=1.0)  # better at everything but held-out loss
    assert not worse_loss.became_champion and "eval_loss" in worse_loss.decided_by
    assert str(client.get_model_version_by_alias("medtune", "champion").version) == learns.version

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/medtune@champion")
    answers = loaded.predict(["我咳嗽、咽喉肿痛，适合什么中成药？"])
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)


def test_registering_leaves_the_process_mlflow_uris_as_they_were(monkeypatch, tmp_path):
    """``registered_model`` points mlflow's fluent API at the run's store while it logs, through the
    public API only, and leaves the process as it found it (nothing set, or the user's setting)."""
    import os

    import mlflow
    from pipeline.stages.registered_model import _uris

    store = f"sqlite:///{tmp_path}/m.db"
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    before = mlflow.get_tracking_uri()
    with _uris(store):
        assert mlflow.get_tracking_uri() == store and mlflow.get_registry_uri() == store
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/user.db")
    with _uris(store):
        assert mlflow.get_tracking_uri() == store
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/user.db"
    mlflow.set_tracking_uri(None)


class Killed(BaseException):
    """What SIGKILL or Ctrl-C leaves behind: no handler runs."""


def test_a_registration_cut_between_version_and_alias_is_finished_by_the_next(merged, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.stages.registered_model import register_merged_model

    dest, _ = merged
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("medtune", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id, "FINISHED")
    kwargs = dict(
        name="medtune",
        merged_dir=str(dest),
        merged_id="m1",
        run_id=run_id,
        figures={"rouge_l": 10.0},
        tags={},
        system_prompt="系统",
        max_new_tokens=4,
    )

    def killed(*args, **kw):
        raise Killed

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", killed)
    with pytest.raises(Killed):
        register_merged_model(uri, **kwargs)
    monkeypatch.undo()
    cut = client.get_model_version("medtune", "1")
    assert not cut.aliases and not cut.description  # registered, nothing after
    again = register_merged_model(uri, **kwargs)
    assert again.version == "1" and again.reused and again.aliases == ["challenger", "champion"]
    assert "held-out ROUGE-L (rouge_l) 10.0000" in client.get_model_version("medtune", "1").description


def test_the_version_names_its_data_and_its_model_shows_the_tuned_figures_as_its_own(merged, tmp_path):
    import pandas as pd
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.core.lineage import DataFile, log_data_inputs
    from pipeline.stages.registered_model import DATA_TAG, model_metrics, register_merged_model

    dest, _ = merged
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("medtune", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    files = []
    for split, rows in (("train", 7), ("eval", 3)):
        path = tmp_path / f"{split}.parquet"
        pd.DataFrame({"record_id": [str(i) for i in range(rows)], "input_ids": [[1, 2]] * rows}).to_parquet(path)
        files.append(DataFile(f"medtune-{split}", str(path), "f" * 64, "training" if split == "train" else "eval"))
    log_data_inputs(client, run_id, files)
    # the training curve: step 0 is the base model's evaluation, under the name eval_loss
    client.log_batch(run_id, metrics=[Metric("eval_loss", 3.0, 0, 0), Metric("eval_loss", 1.0, 0, 5)])
    client.set_terminated(run_id, "FINISHED")
    summary = {
        "tuned": {"eval": {"loss": 0.9, "rouge_l": 20.0, "choice_accuracy": 0.0}},
        "base": {"eval": {"loss": 3.0, "rouge_l": 5.0, "choice_accuracy": 0.2}},
    }
    reg = register_merged_model(
        uri,
        name="medtune",
        merged_dir=str(dest),
        merged_id="m1",
        run_id=run_id,
        figures={"eval_loss": 0.9, "choice_accuracy": 0.65, "rouge_l": 20.0},
        tags={},
        system_prompt="系统",
        max_new_tokens=4,
        model_metrics=model_metrics(summary),
    )
    version = client.get_model_version("medtune", reg.version)
    assert version.tags[DATA_TAG] == (
        "training: medtune-train (digest ffffffffffffffff, 7 rows); "
        "eval: medtune-eval (digest ffffffffffffffff, 3 rows)"
    )
    assert "Trained on training: medtune-train" in version.description
    assert "medicine choice over every evaluated row, held-out and sampled training (choice_accuracy) 0.6500" in (
        version.description
    )
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert {d.dataset.name: json.loads(d.dataset.profile)["num_rows"] for d in inputs} == {
        "medtune-train": 7,
        "medtune-eval": 3,
    }
    columns = json.loads(inputs[0].dataset.schema)["mlflow_colspec"]
    assert {c["name"]: c["type"] for c in columns} == {"record_id": "string", "input_ids": "array"}
    (output,) = client.get_run(run_id).outputs.model_outputs
    own = {m.key: m for m in client.get_logged_model(output.model_id).metrics}
    assert own["heldout_loss"].value == 0.9 and own["base_heldout_loss"].value == 3.0
    assert own["heldout_choice_accuracy"].value == 0.0 and own["heldout_rouge_l"].dataset_name == "medtune-eval"
    assert "eval_loss" not in own, "the base model's first evaluation is not the model's figure"


def test_a_model_name_that_would_break_the_registrys_filters_is_refused():
    from pydantic import ValidationError

    from assets.registered_model import RegisteredModelConfig

    assert RegisteredModelConfig(model_name="medtune-中成药 v2").model_name == "medtune-中成药 v2"
    for name in ("med'tune", 'med"tune', "med`tune", "med\\tune"):
        with pytest.raises(ValidationError, match="model_name"):
            RegisteredModelConfig(model_name=name)
