"""`make serve`'s limits (pipeline/ops/serve_limits.py) over real HTTP: MLflow's scoring app for the
tiny model's pyfunc behind LimitedApp, run by uvicorn on a free loopback port. A forward hook
slows each decoding step (as a slow machine would) and counts the steps, so a test can see that a
refused, timed-out or abandoned request's generation really stopped."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time

import pytest

from pipeline.ops.serve_limits import LimitedApp, Limits, build_app

QUESTION = "咳嗽，咽喉肿痛，用什么中成药？"


class Steps:
    """A forward pre-hook: sleeps ``delay`` per model call and counts the calls."""

    def __init__(self):
        self.delay, self.count = 0.0, 0

    def __call__(self, module, args, kwargs):
        self.count += 1
        time.sleep(self.delay)


@pytest.fixture(scope="module")
def scoring(tiny_model_dir, tmp_path_factory):
    """(MLflow's scoring app behind the limits' cancel hook, the step counter)."""
    import mlflow
    from pipeline.stages.registered_model import pyfunc_model_kwargs

    path = tmp_path_factory.mktemp("limits") / "model"
    mlflow.pyfunc.save_model(
        str(path),
        **pyfunc_model_kwargs({"model": str(tiny_model_dir)}, system_prompt="", max_new_tokens=8, model_name="medtune"),
    )
    model = mlflow.pyfunc.load_model(str(path))
    steps = Steps()
    model.unwrap_python_model().model.register_forward_pre_hook(steps, with_kwargs=True)
    return build_app(model, Limits(timeout_s=60, max_tokens=200)).app, steps


@contextlib.contextmanager
def serving(scoring, **limits):
    import uvicorn

    app = LimitedApp(scoring[0], Limits(**{"timeout_s": 60, "max_tokens": 200, **limits}))
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
    try:
        yield port, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def post(port: int, body, timeout: float = 120) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers); ``body`` a dict, or bytes sent as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/invocations", body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw or b"{}"), {k.lower(): v for k, v in resp.getheaders()}


def chat(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens}


def wait_still(steps: Steps, quiet: float = 0.6, limit: float = 10) -> int:
    """The step count once it has not moved for ``quiet`` seconds (a generation that stopped)."""
    deadline = time.monotonic() + limit
    last = steps.count
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if steps.count == last:
            return last
        last = steps.count
    raise AssertionError(f"the generation is still running after {limit} s ({steps.count} steps)")


def test_a_body_over_the_limit_is_refused_with_413_whether_announced_or_streamed(scoring):
    with serving(scoring, max_body=4096) as (port, app):
        status, error, _ = post(port, {"inputs": ["x" * 5000]})
        assert status == 413 and "limit of 4096 bytes" in error["message"], error
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # chunked: no Content-Length to trust
        conn.request(
            "POST", "/invocations", body=iter([b'{"inputs": ["', b"y" * 3000, b"y" * 3000, b'"]}']), encode_chunked=True
        )
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
        conn.close()
        status, answer, _ = post(port, {"inputs": [QUESTION], "params": {"max_tokens": 2}})
        assert status == 200 and len(answer["predictions"]) == 1, answer
        assert app.stats == {413: 2, 200: 1}


def test_max_tokens_beyond_what_the_timeout_is_sized_for_is_a_400_naming_both(scoring):
    with serving(scoring, max_tokens=50, timeout_s=9) as (port, _):
        for body in (
            chat(51),
            {"inputs": [QUESTION], "params": {"max_tokens": 400}},
            {**chat(5), "max_completion_tokens": 60},
        ):
            status, error, _ = post(port, body)
            assert (
                status == 400 and "above this server's limit of 50" in error["message"] and "9 s" in error["message"]
            ), (body, error)
        status, answer, _ = post(port, chat(50))
        assert status == 200 and answer["usage"]["completion_tokens"] == 50


def test_beyond_the_slots_and_the_queue_requests_get_503_with_retry_after(scoring):
    steps = scoring[1]
    steps.delay = 0.05  # 40 tokens: about 2 s each
    try:
        with serving(scoring, concurrency=1, queue=1, timeout_s=30) as (port, app):
            results = []
            threads = [threading.Thread(target=lambda: results.append(post(port, chat(40)))) for _ in range(4)]
            for t in threads:
                t.start()
                time.sleep(0.1)  # in order: the first generates, the second waits, the others find it full
            for t in threads:
                t.join()
    finally:
        steps.delay = 0.0
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503, 503], [(r[0], r[1]) for r in results]
    for status, body, headers in results:
        if status == 503:
            assert headers["retry-after"] == "10" and "queue is full" in body["message"], (body, headers)
        else:
            assert body["usage"]["completion_tokens"] == 40
    assert app.stats == {200: 2, 503: 2}


def test_an_answer_past_the_timeout_is_stopped_and_its_slot_freed(scoring):
    steps = scoring[1]
    steps.delay = 0.1  # 150 tokens would take 15 s
    try:
        with serving(scoring, concurrency=1, queue=0, timeout_s=2) as (port, _):
            start, before = time.monotonic(), steps.count
            status, error, headers = post(port, chat(150))
            took = time.monotonic() - start
            assert status == 503 and "generation was stopped" in error["message"] and "retry-after" in headers, error
            assert took < 4, f"answered after {took:.1f} s with a 2 s timeout"
            stopped_at = wait_still(steps)
            assert stopped_at - before < 40, f"{stopped_at - before} steps: the generation went on after its 503"
            steps.delay = 0.0
            status, answer, _ = post(port, chat(3))  # the one slot is free again
            assert status == 200 and answer["usage"]["completion_tokens"] == 3
    finally:
        steps.delay = 0.0


def stream(port: int, body: dict, timeout: float = 60) -> list[bytes]:
    """The server-sent events of a streamed ``/v1/chat/completions`` answer, as they arrive."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode())
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    events = [e for e in resp.read().split(b"\n\n") if e.strip()]
    conn.close()
    return events


def test_a_streamed_answer_past_the_timeout_ends_with_an_error_event_and_stops(scoring):
    steps = scoring[1]
    steps.delay = 0.1  # 150 tokens would take 15 s
    try:
        with serving(scoring, concurrency=1, queue=0, timeout_s=2) as (port, _):
            start, before = time.monotonic(), steps.count
            events = stream(port, {**chat(150), "temperature": 1.5, "seed": 3})
            assert time.monotonic() - start < 4
            assert events[-1] == b"data: [DONE]" and b"timeout" in events[-2], events[-3:]
            stopped_at = wait_still(steps)
            assert stopped_at - before < 40, f"{stopped_at - before} steps: the generation went on after the timeout"
    finally:
        steps.delay = 0.0


def test_a_stop_string_ends_a_streamed_generation_there(scoring):
    steps = scoring[1]
    with serving(scoring, timeout_s=60) as (port, _):
        sampled = {"temperature": 1.5, "seed": 3}
        text = "".join(
            json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
            for e in stream(port, {**chat(40), **sampled})[:-1]
        )
        assert len(text) > 6, text
        steps.delay = 0.05
        before = steps.count
        events = stream(port, {**chat(150), **sampled, "stop": text[4:6]})
        assert events[-1] == b"data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"
        stopped_at = wait_still(steps)
        assert stopped_at - before < 60, f"{stopped_at - before} steps: the generation went on past its stop string"
    steps.delay = 0.0


def test_a_client_that_disconnects_frees_its_generation(scoring):
    steps = scoring[1]
    steps.delay = 0.1
    try:
        with serving(scoring, concurrency=1, queue=0, timeout_s=60) as (port, _):
            before = steps.count
            body = json.dumps(chat(150)).encode()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(
                    b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                time.sleep(1.0)  # generating
            stopped_at = wait_still(steps)
            assert stopped_at - before < 40, (
                f"{stopped_at - before} steps: the generation went on after the client left"
            )
            steps.delay = 0.0
            status, answer, _ = post(port, chat(3), timeout=30)
            assert status == 200 and answer["usage"]["completion_tokens"] == 3
    finally:
        steps.delay = 0.0


def test_health_and_version_pass_through(scoring):
    with serving(scoring) as (port, _):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/ping")
        assert conn.getresponse().status == 200
        conn.close()
