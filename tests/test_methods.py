"""Every fine-tuning method on the tiny model: it trains (eval loss falls), saves, reloads, resumes
exactly from a checkpoint, evaluates base vs tuned, and exports: merged with float64 logits within
1e-4 where it can be merged, refused with a reason where it cannot, the model itself for ``full``."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import demo_records, mlflow_store
from pipeline.stages.lora_adapter import TrainSpec, adapter_id, train
from pipeline.stages.lora_adapter.methods import MERGEABLE, METHODS, PROMPT_LEARNING, MethodError
from pipeline.stages.tokenized_dataset import tokenize_dataset

# learning rates that move each method within 8 steps of the tiny model (prompt learning and IA3
# train a handful of parameters and take larger steps, as their papers do)
LR = {"prompt_tuning": 3e-2, "prefix_tuning": 3e-2, "p_tuning": 1e-2, "ia3": 3e-2, "adalora": 2e-2, "full": 1e-3}


@pytest.fixture(scope="module")
def tokenized(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    df = pd.DataFrame(demo_records(20))
    df.insert(0, "record_id", [f"r{i}" for i in range(len(df))])
    df["split"] = ["eval" if i % 5 == 0 else "train" for i in range(len(df))]
    return tokenize_dataset(
        df,
        tok,
        data_fingerprint="m",
        tokenizer_fingerprint="m",
        out_root=tmp_path_factory.mktemp("tok"),
        max_seq_len=256,
        system_prompt="你是助手。",
    ).path


def spec_for(root: Path, tiny_model_dir, tokenized, method: str, **kw) -> TrainSpec:
    settings = dict(
        base_model_path=str(tiny_model_dir),
        tokenized_path=tokenized,
        output_dir=str(root / "out"),
        checkpoint_dir=str(root / "ckpt"),
        method=method,
        r=8,
        lora_alpha=16,
        num_virtual_tokens=8,
        max_steps=8,
        save_every=4,
        eval_every=8,
        log_every=4,
        learning_rate=LR.get(method, 5e-3),
        warmup_ratio=0.0,
        precision="fp32",
        compile=False,
        pack_tokens=512,
    )
    settings.update(kw)
    return TrainSpec(**settings)


def weights(folder: Path) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tokenized, tmp_path_factory):
    """Each method trained once (8 steps, a checkpoint at step 4), shared by the tests below."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(method: str):
        if method not in cache:
            root = tmp_path_factory.mktemp(method)
            cache[method] = (root, train(spec_for(root, tiny_model_dir, tokenized, method)))
        return cache[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_saves_and_reports_its_size(method, trained):
    root, result = trained(method)
    assert result["method"] == method and result["steps"] == 8
    assert result["final_eval_loss"] < result["first_eval_loss"] - 1e-3, result
    files = {p.name for p in (root / "out").iterdir()}
    if method == "full":
        assert "config.json" in files and "adapter_config.json" not in files
        assert result["trainable_parameters"] == result["total_parameters"]
    else:
        assert "adapter_config.json" in files and "adapter_model.safetensors" in files
        assert 0 < result["trainable_parameters"] < result["total_parameters"] / 10
    assert result["adapter_bytes"] == sum(p.stat().st_size for p in (root / "out").glob("*.safetensors")) > 0


@pytest.mark.parametrize("method", ["adalora", "pissa", "prefix_tuning", "full"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_result(
    method, trained, tiny_model_dir, tokenized, tmp_path
):
    """The uninterrupted run left its step-4 checkpoint; a run that finds it continues from there and
    ends with the same weights, bit for bit (AdaLoRA's importance scores and rank pattern included)."""
    root, _ = trained(method)
    assert (root / "ckpt" / "step-4" / "trainer_state.json").is_file()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    for later in ckpt.glob("step-*"):
        if later.name != "step-4":
            shutil.rmtree(later)
    resumed = train(spec_for(tmp_path, tiny_model_dir, tokenized, method, checkpoint_dir=str(ckpt)))
    assert resumed["resumed_from"] == "step-4"
    a, b = weights(tmp_path / "out"), weights(root / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ][:3]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_evaluates_against_its_base_and_exports(method, trained, tiny_model_dir, tokenizer, tmp_path):
    from pipeline.stages.lora_adapter.generation import answer_losses, generate_greedy, load_tuned_model, stop_token_ids
    from pipeline.stages.merged_model import ExportError, compare_with_adapter, load_merged, merge_adapter
    from pipeline.stages.tokenized_dataset import render_prompt

    root, _ = trained(method)
    model, tok = load_tuned_model(str(tiny_model_dir), str(root / "out"))
    prompts = [
        render_prompt(tok, "病例：咳嗽发热三天，咽喉肿痛。", "", "你是助手。"),
        render_prompt(tok, "头痛，失眠。", "", "你是助手。"),
    ]
    rows = [
        (tok(p + "板蓝根颗粒可能适合治疗您的病症。<|im_end|>", add_special_tokens=False)["input_ids"], None)
        for p in prompts
    ]
    rows = [(ids, [-100] * 20 + ids[20:]) for ids, _ in rows]
    pad = stop_token_ids(tok)[0]
    mean = lambda losses: [s / n for s, n in losses]  # noqa: E731
    tuned = mean(answer_losses(model, rows, pad))
    with model.disable_adapter():
        base = mean(answer_losses(model, rows, pad))
        base_answers = generate_greedy(model, tok, prompts, max_new_tokens=4, stop_ids=stop_token_ids(tok))
    # the base is the untouched base model, and the tuned model differs from it
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert mean(answer_losses(plain, rows, pad)) == pytest.approx(base, rel=1e-5)
    assert generate_greedy(plain, tok, prompts, max_new_tokens=4, stop_ids=stop_token_ids(tok)) == base_answers
    assert tuned != pytest.approx(base, rel=1e-4)
    # the evaluation's decoding over stacked caches answers as the model's own generate, whatever the method
    stops = stop_token_ids(tok)
    ours = generate_greedy(model, tok, prompts, max_new_tokens=6, stop_ids=stops, batch_size=2)
    for prompt, got in zip(prompts, ours):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )[0, ids.shape[1] :].tolist()
        assert got == ref[: next((k for k, t in enumerate(ref) if t in stops), len(ref))]

    dest = tmp_path / "export"

    def check(folder):
        return compare_with_adapter(model, load_merged(folder), tok, prompts, max_new_tokens=8).as_dict()

    if method in PROMPT_LEARNING:
        with pytest.raises(ExportError, match="cannot be merged"):
            merge_adapter(str(tiny_model_dir), str(root / "out"), dest, verify=check)
        assert not dest.exists()
        return
    info = merge_adapter(str(tiny_model_dir), str(root / "out"), dest, verify=check)
    v = info["verification"]
    assert v["precision"] == "float64" and v["max_abs_logit_diff"] <= 1e-4 and v["greedy_identical"], v
    assert not (dest / "adapter_config.json").exists()
    assert method in MERGEABLE or (method == "full" and v["max_abs_logit_diff"] == 0.0)


def test_prompt_learning_over_its_cache_computes_what_peft_computes(trained, tiny_model_dir, tokenizer):
    """Training and evaluation run the inputs over the virtual tokens' KV cache; peft's own forward
    prepends the virtual tokens: same logits (1e-5) and the same greedy tokens as peft's generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.stages.lora_adapter.inference import load_trained

    ids = torch.tensor([tokenizer("病例：咳嗽发热三天，咽喉肿痛。")["input_ids"]])
    for method in PROMPT_LEARNING:
        root, _ = trained(method)
        ours, _, _ = load_trained(str(tiny_model_dir), str(root / "out"))
        theirs = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(root / "out")
        ).eval()
        with torch.no_grad():
            a = ours(input_ids=ids).logits
            b = theirs(input_ids=ids).logits
            b = b[:, -a.shape[1] :]  # prompt tuning's logits include the virtual positions
            assert (a - b).abs().max() < 1e-5, method
            mine = ours.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
            peft_out = theirs.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert mine[0].tolist() == peft_out[0, -mine.shape[1] :].tolist(), method


def test_method_settings_join_the_key_only_when_used():
    spec = TrainSpec(base_model_path="", tokenized_path="", output_dir="", checkpoint_dir="").model_dump()
    key = adapter_id("d", "b", spec, 1)
    assert adapter_id("d", "b", {**spec, "method": "dora"}, 1) != key
    assert adapter_id("d", "b", {**spec, "num_virtual_tokens": 30}, 1) != key
    assert adapter_id("d", "b", {**spec, "optimizer": "adafactor"}, 1) != key
    lora_without_new_fields = {k: v for k, v in spec.items() if k not in ("method", "num_virtual_tokens", "optimizer")}
    assert adapter_id("d", "b", lora_without_new_fields, 1) == key


def test_an_unknown_method_and_checkpointed_prompt_learning_are_refused(tiny_model_dir, tokenized, tmp_path):
    with pytest.raises(ValidationError, match="method\n.*'lora', 'dora'"):  # the spec refuses it, naming the methods
        spec_for(tmp_path, tiny_model_dir, tokenized, "qlora")
    with pytest.raises(MethodError, match="gradient checkpointing"):
        train(spec_for(tmp_path, tiny_model_dir, tokenized, "prefix_tuning", gradient_checkpointing=True))


def test_a_prompt_learning_adapter_registers_with_its_base_and_the_pyfunc_answers_as_it_does(
    trained, tiny_model_dir, tmp_path
):
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline.stages.lora_adapter.generation import stop_token_ids
    from pipeline.stages.lora_adapter.inference import load_trained
    from pipeline.stages.registered_model import register_merged_model
    from pipeline.stages.tokenized_dataset import render_prompt

    root, _ = trained("prompt_tuning")
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("medtune", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    reg = register_merged_model(
        uri,
        name="medtune",
        merged_dir=None,
        merged_id="pt",
        run_id=run_id,
        figures={"rouge_l": 1.0},
        tags={},
        system_prompt="你是助手。",
        max_new_tokens=8,
        adapter_dir=str(root / "out"),
        base_dir=str(tiny_model_dir),
    )
    assert reg.became_champion
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    question = "病例：咳嗽发热三天，咽喉肿痛。"
    (answer,) = mlflow.pyfunc.load_model("models:/medtune@champion").predict([question])
    model, tok, _ = load_trained(str(tiny_model_dir), str(root / "out"))
    ids = tok(render_prompt(tok, question, "", "你是助手。"), add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    stops = stop_token_ids(tok)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
        )
    assert answer == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="adapter folder with its base"):
        register_merged_model(
            uri,
            name="medtune",
            merged_dir=None,
            merged_id="x",
            run_id=run_id,
            figures={"rouge_l": 1.0},
            tags={},
            system_prompt="",
            adapter_dir=str(root / "out"),
        )
