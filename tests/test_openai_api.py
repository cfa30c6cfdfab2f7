"""OpenAI's chat-completions API of ``make serve``, through the official ``openai`` client against a
real server (uvicorn, the tiny model as a logged pyfunc, the limits in front)."""

import json
import socket
import threading
import time

import pytest

from pipeline.ops.openai_api import StreamText
from pipeline.ops.serve_limits import Limits, build_app

QUESTION = "咳嗽，咽喉肿痛，用什么中成药？"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(base URL of a running server for the tiny model named ``medtune@champion``, the app)."""
    import uvicorn

    import mlflow
    from pipeline.stages.registered_model import pyfunc_model_kwargs

    path = tmp_path_factory.mktemp("openai") / "model"
    kwargs = pyfunc_model_kwargs(
        {"model": str(tiny_model_dir)}, system_prompt="", max_new_tokens=8, model_name="medtune"
    )
    mlflow.pyfunc.save_model(str(path), **kwargs)
    app = build_app(mlflow.pyfunc.load_model(str(path)), Limits(timeout_s=60, max_tokens=64), name="medtune@champion")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


# the tiny random model's greedy answer is blank lines: a seeded sample has text to compare, and
# repeats exactly (the seed forks torch's generator per request)
SAMPLED = {"temperature": 1.5, "seed": 11}


def ask(client, **kw):
    return client.chat.completions.create(
        model="medtune@champion", messages=[{"role": "user", "content": QUESTION}], **kw
    )


def test_one_answer_in_the_chat_completion_shape(client):
    answer = ask(client, max_tokens=12, **SAMPLED)
    assert answer.object == "chat.completion" and answer.model == "medtune@champion"
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 0
    # max_completion_tokens, the newer name, limits the same way
    assert ask(client, max_completion_tokens=12, **SAMPLED).choices[0].message.content == choice.message.content


@pytest.mark.parametrize("decoding", [SAMPLED, {"temperature": 0}], ids=["seeded", "greedy"])
def test_a_streamed_answer_joins_to_the_unstreamed_one(client, decoding):
    whole = ask(client, max_tokens=24, **decoding).choices[0].message.content
    stream = ask(client, max_tokens=24, stream=True, **decoding)
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    if decoding is SAMPLED:
        assert len([c for c in chunks if c.choices[0].delta.content]) > 1, "sent as it was generated, not at once"


def test_stop_cuts_the_answer_streamed_or_not(client):
    whole = ask(client, max_tokens=24, **SAMPLED).choices[0].message.content
    assert len(whole) > 4, whole
    stop = whole[3:5]
    cut = ask(client, max_tokens=24, stop=[stop], **SAMPLED).choices[0]
    assert cut.message.content == whole[: whole.index(stop)] and cut.finish_reason == "stop"
    streamed = list(ask(client, max_tokens=24, stop=stop, stream=True, **SAMPLED))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.message.content
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_seeded_sample_repeats_and_another_seed_differs(client):
    first = ask(client, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert ask(client, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content == first
    assert ask(client, max_tokens=12, temperature=1.0, top_p=0.9, seed=8).choices[0].message.content != first


def test_bad_requests_get_400_in_openai_shape(client, server):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="medtune@champion", messages=[{"role": "robot", "content": "hi"}])
    assert err.value.status_code == 400 and "role" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, max_tokens=0)
    assert "max_tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # above what the timeout is sized for: the limits say so
        ask(client, max_tokens=65)
    assert "64" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    assert "medtune@champion" in err.value.message
    status, body = _post(server[0] + "/v1/chat/completions", b"{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _post(server[0] + "/v1/chat/completions", json.dumps({"messages": [], "tools": []}).encode())
    assert status == 400 and "tools" in body["error"]["message"]


def test_the_model_list_and_mlflow_path_stay(client, server):
    assert [m.id for m in client.models.list().data] == ["medtune@champion"]
    status, body = _post(
        server[0] + "/invocations", json.dumps({"inputs": [QUESTION], "params": {"max_tokens": 4}}).encode()
    )
    assert status == 200 and isinstance(body["predictions"][0], str)


@pytest.mark.parametrize(
    "pieces, stop, expected",
    [
        (["  你", "好 ", " 世界\n"], [], ["你", "好", "  世界", ""]),
        (["ab", "c<", "|e", "nd|>xyz"], ["<|end|>"], ["ab", "c", "", ""]),
        (["a<", "b"], ["<|"], ["a", "<b", ""]),
        (["x", "yz"], ["yz"], ["x", "", ""]),
        (["a ", "b", "stop"], ["stop"], ["a", " b", ""]),
    ],
)
def test_stream_text_trims_and_stops_like_the_whole_answer(pieces, stop, expected):
    text = StreamText(stop)
    out = [text.feed(p) for p in pieces]
    out.append(text.end())
    assert out[: len(expected)] == expected[: len(out)]
    whole = "".join(pieces).strip()
    for s in stop:
        whole = whole[: whole.index(s)] if s in whole else whole
    assert "".join(out) == whole


def _post(url: str, body: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
