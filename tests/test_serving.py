"""The registered pyfunc's two ways in (pipeline/stages/registered_model/serving.py) and how
`make serve` resolves what to serve (pipeline/ops/serve.py), on the tiny model, in process. The
real HTTP server over a pipeline-registered champion: tests/test_e2e_servers.py (`make serve` over the champion)."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from conftest import mlflow_store

QUESTION = "咳嗽，咽喉肿痛，用什么中成药？"
SYSTEM = "你是中成药助手。"


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    import mlflow
    from pipeline.stages.registered_model import pyfunc_model_kwargs

    path = tmp_path_factory.mktemp("served") / "model"
    mlflow.pyfunc.save_model(
        str(path),
        **pyfunc_model_kwargs(
            {"model": str(tiny_model_dir)}, system_prompt=SYSTEM, max_new_tokens=8, model_name="medtune"
        ),
    )
    loaded = mlflow.pyfunc.load_model(str(path))
    # MLflow runs its own copy of serving.py (a model from code), which line coverage does not count
    # as the project's file: once the copy is shown to be the source byte for byte, the loaded model
    # answers through the source module's class (same code, same context, MLflow's signature checks)
    from pipeline.stages.registered_model import SERVING_FILE
    from pipeline.stages.registered_model.serving import MedTuneChatModel

    assert (path / SERVING_FILE.name).read_bytes() == SERVING_FILE.read_bytes()
    wrapper = loaded._model_impl
    assert type(wrapper.python_model).__name__ == MedTuneChatModel.__name__
    source = MedTuneChatModel()
    source.load_context(wrapper.context)
    wrapper.python_model = source
    return loaded


def chat(content: str = QUESTION, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], **fields}


def sampled(served, request_, **params):
    """The tiny random model's greedy answer is blank lines: sample (temperature 1.5) from a fixed
    torch seed instead, so that answers have text to compare."""
    import torch

    torch.manual_seed(11)
    return served.predict(request_, params={"temperature": 1.5, **params})


def test_a_chat_request_answers_in_the_chat_completions_shape_with_the_list_answer(served):
    from mlflow.types.llm import ChatCompletionResponse

    answer = served.predict(chat(), params={"max_tokens": 6})
    parsed = ChatCompletionResponse.from_dict(answer)
    assert (
        answer["object"] == "chat.completion" and answer["model"] == "medtune" and answer["id"].startswith("chatcmpl-")
    )
    assert parsed.choices[0].message.role == "assistant" and answer["choices"][0]["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert (
        1 <= usage["completion_tokens"] <= 6
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    assert served.predict([QUESTION], params={"max_tokens": 6}) == [answer["choices"][0]["message"]["content"]]
    text = sampled(served, chat(), max_tokens=8)["choices"][0]["message"]["content"]
    assert text and sampled(served, [QUESTION], max_tokens=8) == [text]  # same template, system prompt, decoding
    assert served.predict([QUESTION]) == served.predict([QUESTION], params={"max_tokens": 8})  # the registered default


def test_the_request_s_system_message_replaces_the_trained_one(served):
    trained = served.predict(chat(), params={"max_tokens": 1})["usage"]["prompt_tokens"]
    mine = {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": QUESTION}]}
    assert served.predict(mine, params={"max_tokens": 1})["usage"]["prompt_tokens"] < trained


def test_stop_strings_end_the_answer_and_sampling_follows_its_seed(served):
    full = sampled(served, chat(), max_tokens=12)["choices"][0]["message"]["content"]
    cut = full[len(full) // 2 :][:2]
    assert cut.strip(), full
    stopped = sampled(served, chat(), max_tokens=12, stop=[cut])
    assert (
        stopped["choices"][0]["message"]["content"] == full[: full.index(cut)]
        and stopped["choices"][0]["finish_reason"] == "stop"
    )
    seeded = [
        served.predict(chat(seed=7), params={"max_tokens": 8, "temperature": 1.5})["choices"][0]["message"]["content"]
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1] and seeded[0]


def test_predict_stream_yields_chunks_that_add_up_to_the_answer(served):
    import torch

    whole = sampled(served, chat(), max_tokens=8)["choices"][0]["message"]["content"]
    torch.manual_seed(11)
    chunks = list(served.predict_stream(chat(), params={"max_tokens": 8, "temperature": 1.5}))
    assert (
        all(c["object"] == "chat.completion.chunk" for c in chunks)
        and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    )
    assert len(chunks) > 2 and "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == whole


@pytest.mark.parametrize(
    "request_, params, said",
    [
        ({"messages": []}, None, '"messages" must be a non-empty list'),
        ({"messages": [{"content": "hi"}]}, None, 'messages[0] must be an object with "role"'),
        (
            {"messages": [{"role": "tool", "content": "hi"}]},
            None,
            "messages[0].role must be one of system, user, assistant",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, None, "messages[0].content must be a string"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
            None,
            "the last message must be the user's",
        ),
        (chat(logprobs=True), None, "unknown chat-completions fields: logprobs"),
        (chat(), {"stream": True}, '"stream": true is not served'),
        (chat(), {"n": 2}, '"n" must be 1'),
        (chat(), {"max_tokens": 0}, '"max_tokens" must be a whole number from 1 to 4096'),
        (chat(), {"max_tokens": "lots"}, "max_tokens"),  # MLflow's own param check (the signature)
        (chat(), {"temperature": -1.0}, '"temperature" must be from 0 to 2'),
        (chat(seed="7"), None, '"seed" must be a whole number'),
        (chat(seed=-1), None, '"seed" must be a whole number from 0'),
        (chat(temperature=1.0, top_p=1.5), None, '"top_p" must be above 0 and at most 1, got 1.5'),
        (chat(top_p="high"), None, '"top_p" must be a number'),
        (chat(top_k=-1), None, '"top_k" must be a whole number, 0 or more'),
        (
            chat(QUESTION * 20, max_tokens=4000),
            None,
            "plus max_tokens (4000) exceeds the model's context of 4096 tokens",
        ),
        (["q"] * 17, None, "17 questions in one request: at most 16"),
        ({"prompt_text": ["hi"]}, None, 'a chat request needs "messages"'),
    ],
)
def test_a_malformed_request_is_refused_with_the_reason(served, request_, params, said):
    with pytest.raises(MlflowException) as e:
        served.predict(request_, params=params)
    assert said in e.value.message and e.value.get_http_status_code() == 400


def test_content_parts_and_openai_client_fields_are_understood(served):
    parts = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        "model": "gpt-x",
        "user": "u1",
        "max_completion_tokens": 3,
    }
    answer = served.predict(parts)
    assert answer["usage"]["completion_tokens"] <= 3
    assert (
        answer["choices"][0]["message"]["content"]
        == served.predict(chat(), params={"max_tokens": 3})["choices"][0]["message"]["content"]
    )


def test_make_serve_resolves_versions_aliases_and_folders_and_says_what_exists(tiny_model_dir, tmp_path):
    import mlflow
    from pipeline.ops.serve import ServeError, merged_system_prompt, request_timeout, resolve
    from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT

    uri = mlflow_store(tmp_path / "mlflow.db")
    with pytest.raises(ServeError, match="has no alias 'champion'.*nothing registered yet"):
        resolve("champion", uri, tmp_path / "served")
    with pytest.raises(ServeError, match="unknown model 'what'"):
        resolve("what", uri, tmp_path / "served")
    with pytest.raises(ServeError, match="neither an MLflow model folder"):
        resolve(str(tmp_path), uri, tmp_path / "served")
    served = resolve(str(tiny_model_dir), uri, tmp_path / "served", max_new_tokens=32)
    folder = tmp_path / "served" / served.uri.rsplit("/", 1)[-1]
    assert (folder / "MLmodel").is_file() and resolve(
        str(tiny_model_dir), uri, tmp_path / "served", 32
    ).uri == served.uri  # wrapped once
    config = mlflow.pyfunc.load_model(str(folder)).model_config
    assert config == {"system_prompt": DEFAULT_SYSTEM_PROMPT, "max_new_tokens": 32, "model_name": tiny_model_dir.name}
    assert merged_system_prompt(tiny_model_dir) == DEFAULT_SYSTEM_PROMPT  # no export record: the default
    assert resolve(str(folder), uri, tmp_path / "served").uri == str(folder)  # an MLflow model folder as it is
    assert request_timeout(256, 0.05) == 60 and request_timeout(256, 0.5) == 3 * 128 + 10


def test_concurrent_seeded_requests_answer_as_they_do_alone(served):
    """Sampling draws from torch's one generator: a seeded request holds it from its seed to its
    last token, so requests running at once (seeded or not) do not change each other's answers."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(seed):
        request_ = chat(seed=seed) if seed is not None else chat()
        return served.predict(request_, params={"max_tokens": 8, "temperature": 1.5})["choices"][0]["message"][
            "content"
        ]

    alone = {seed: ask(seed) for seed in (1, 2, 3)}
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, [1, 2, 3, None, None, None] * 2))
    assert [together[i] for i in (0, 1, 2, 6, 7, 8)] == [alone[1], alone[2], alone[3]] * 2
    unseeded = {ask(None) for _ in range(4)}  # without a seed, answers still vary
    assert len(unseeded) > 1


def test_a_non_loopback_host_needs_an_explicit_flag_and_is_told_there_is_no_authentication(capsys, monkeypatch):
    from pipeline.ops import serve

    for host in ("0.0.0.0", "10.0.0.5", "::", "my-host.example"):
        assert serve.main(["--host", host]) == 2
        assert "has no authentication; pass --allow-remote" in capsys.readouterr().err
    assert all(serve.loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"))
    monkeypatch.setattr(serve, "resolve", lambda *a, **k: (_ for _ in ()).throw(serve.ServeError("stop here")))
    assert serve.main(["--host", "0.0.0.0", "--allow-remote"]) == 2
    err = capsys.readouterr().err
    assert "WARNING: serving on 0.0.0.0 without authentication" in err and "stop here" in err
