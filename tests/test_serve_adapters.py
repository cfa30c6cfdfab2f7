"""Several adapters over one base in one server: each request's ``model`` picks its adapter, and
each answers as its own merged model does."""

import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline.ops.serve_adapters import AdapterError, from_folder, load_adapters, no_mlflow_path
from pipeline.ops.serve_limits import Limits, serve_models

QUESTION = "咳嗽，咽喉肿痛，用什么中成药？"
SAMPLED = {"temperature": 1.5, "seed": 5}  # the tiny model's greedy answers are blank: a seeded sample has text


def make_adapter(base_dir, folder, seed: int):
    """A LoRA adapter with random (not zero) weights over ``base_dir``, as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(20.0)  # far enough from the base that each adapter answers its own way
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def server(adapters):
    import uvicorn

    served = load_adapters([from_folder(a, a.name) for a in adapters], max_new_tokens=8)
    app = serve_models(no_mlflow_path, served, Limits(timeout_s=60, max_tokens=64))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", served
    server.should_exit = True
    thread.join(timeout=30)


def merged_answer(tiny_model_dir, adapter, request: dict) -> str:
    """The answer of ``adapter`` merged into its base, through the same chat model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.registered_model.serving import MedTuneChatModel
    from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, end_of_turn_id

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    chat = MedTuneChatModel()
    chat.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat.system_prompt, chat.max_new_tokens, chat.name, chat.model = DEFAULT_SYSTEM_PROMPT, 8, "m", merged
    chat.generation_config = merged.generation_config
    chat.generation_config.eos_token_id = end_of_turn_id(chat.tokenizer)
    return chat.predict(None, request)["choices"][0]["message"]["content"]


def test_each_model_name_answers_with_its_adapter_as_its_merged_model_does(server, adapters, tiny_model_dir):
    from openai import OpenAI

    url, served = server
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [a.name for a in adapters]
    messages = [{"role": "user", "content": QUESTION}]
    answers = {}
    for adapter in [*adapters, adapters[0]]:  # back to the first: switching back gives its answer again
        out = client.chat.completions.create(model=adapter.name, messages=messages, max_tokens=8, **SAMPLED)
        assert out.model == adapter.name
        answers.setdefault(adapter.name, set()).add(out.choices[0].message.content)
    assert all(len(v) == 1 for v in answers.values()), answers
    texts = [next(iter(answers[a.name])) for a in adapters]
    assert len(set(texts)) == 3, f"three adapters, three answers: {texts}"
    request = {"messages": messages, "max_tokens": 8, **SAMPLED}
    for adapter, text in zip(adapters, texts):
        assert merged_answer(tiny_model_dir, adapter, request) == text
    streamed = client.chat.completions.create(
        model=adapters[1].name, messages=messages, max_tokens=8, stream=True, **SAMPLED
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == texts[1]
    base_params = sum(p.numel() for n, p in served[0].python_model.model.named_parameters() if "lora_" not in n)
    assert base_params == sum(p.numel() for p in _base(tiny_model_dir).parameters()), "one copy of the base"


def test_mlflow_paths_point_to_v1_and_unknown_names_are_404(server):
    import openai
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": QUESTION}])
    assert "a0" in err.value.message
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url + "/invocations", data=b"{}"), timeout=30)
    assert err.value.code == 404 and b"/v1/chat/completions" in err.value.read()
    assert urllib.request.urlopen(url + "/ping", timeout=30).status == 200


def test_adapters_of_different_bases_are_refused(adapters, tmp_path, tiny_model_dir):
    import shutil

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    moved = make_adapter(other, tmp_path / "b0", seed=9)
    with pytest.raises(AdapterError, match="different base models"):
        load_adapters([from_folder(adapters[0], "a0"), from_folder(moved, "b0")])
    with pytest.raises(AdapterError, match="no adapter"):
        from_folder(tmp_path, "empty")


def _base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_a_registered_version_serves_its_trainings_adapter(adapters, tmp_path, tiny_model_dir):
    """``champion`` or ``medtune/2`` name the adapter of the version's training run: downloaded from
    the run's ``adapter`` artifacts when this machine did not train it."""
    from mlflow.tracking import MlflowClient

    from conftest import mlflow_store
    from pipeline.ops.serve_adapters import resolve_adapter
    from resources.data_root import DataRoot

    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("medtune", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("medtune")
    for i, adapter in enumerate(adapters[:2]):
        run_id = client.create_run(exp, tags={"medtune.adapter_id": f"aid{i}"}).info.run_id
        client.log_artifacts(run_id, str(adapter), "adapter")
        client.set_terminated(run_id, "FINISHED")
        client.create_model_version("medtune", source=f"runs:/{run_id}/merged_model", run_id=run_id)
    client.set_registered_model_alias("medtune", "champion", "1")
    root = DataRoot(path=str(tmp_path / "data"))
    champion = resolve_adapter("champion", uri, root)
    assert champion.name == "medtune@champion" and champion.base == str(tiny_model_dir.resolve())
    assert (root.models_dir / "served" / "adapters" / "aid0" / "adapter_config.json").is_file()
    second = resolve_adapter("medtune/2", uri, root)
    assert second.name == "medtune/2" and Path(second.folder).name == "aid1"
    with pytest.raises(AdapterError, match="no version '7'"):
        resolve_adapter("7", uri, root)
