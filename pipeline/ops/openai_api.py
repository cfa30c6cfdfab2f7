"""OpenAI's chat-completions API for the served model, beside MLflow's ``/invocations``:

- ``POST /v1/chat/completions``: ``messages``, ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``; whole, or with ``"stream": true`` as
  ``chat.completion.chunk`` server-sent events ending in ``data: [DONE]``;
- ``GET /v1/models``: the models this server answers for, by the name a request gives in ``model``.

So the clients apps are written with (the ``openai`` SDKs, LangChain's ``ChatOpenAI``, curl recipes
from vLLM's docs) need only ``base_url``. Errors come in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``). The model is called as MLflow's server calls
it (the logged pyfunc's ``predict`` and ``predict_stream``), so both paths answer the same; the
limits of ``serve_limits.py`` stand in front of both. A streamed answer is cut at a ``stop`` string
here (the text before it is sent, the generation stopped), and its whitespace trimmed as the whole
answer's is, so the chunks join to the text an unstreamed request gets.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from pipeline.ops.serve_limits import CANCEL

CHAT_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/models"
PASSED_ON = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed"}
DROPPED = {"model", "user", "stream", "stream_options"}  # read here, or what clients always send


@dataclass
class ServedModel:
    """One model this server answers for: the name requests give, and the loaded pyfunc's model."""

    name: str
    python_model: object
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.kind, "param": None, "code": self.code}
        return json.dumps({"error": error}, ensure_ascii=False).encode()


def error_body(status: int, message: str) -> bytes:
    """An error in OpenAI's shape, for a status the limits in front of the API give."""
    kinds = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
    return ApiError(status, message, kinds.get(status, "server_error" if status >= 500 else "api_error")).body()


class StreamText:
    """The pieces of a streamed answer as a client should see them: leading whitespace dropped and
    trailing whitespace held back (the whole answer is stripped), and cut before a ``stop`` string
    (a piece that may begin one is held until it is told apart)."""

    def __init__(self, stop: list[str]):
        self.stop, self.held, self.started, self.stopped = [s for s in stop if s], "", False, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        hits = [text.index(s) for s in self.stop if s in text]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = len(text) - len(text.rstrip())  # trailing whitespace waits for what follows
        for s in self.stop:  # so does a tail that may be the start of a stop string
            keep = max(keep, next((k for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), 0))
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def end(self) -> str:
        return "" if self.stopped else self.held.rstrip()


class OpenAIRoutes:
    """ASGI app: the two ``/v1`` routes, every other path to ``app`` (MLflow's scoring server)."""

    def __init__(self, app, models: list[ServedModel]):
        self.app, self.models = app, {m.name: m for m in models}
        self.default = models[0]

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path not in (CHAT_PATH, MODELS_PATH):
            return await self.app(scope, receive, send)
        try:
            if path == MODELS_PATH:
                if scope["method"] != "GET":
                    raise ApiError(405, f"{MODELS_PATH} takes GET")
                return await self._json(send, 200, self.model_list())
            if scope["method"] != "POST":
                raise ApiError(405, f"{CHAT_PATH} takes POST")
            request = parse_request(await _read(receive))
            served = self.pick(request.get("model"))
            if request.get("stream"):
                return await self._stream(send, served, request)
            answer = await asyncio.to_thread(_predict, served, request)
            return await self._json(send, 200, answer)
        except ApiError as exc:
            return await self._send(send, exc.status, exc.body())

    def model_list(self) -> dict:
        data = [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "medtune"} for m in self.models.values()
        ]
        return {"object": "list", "data": data}

    def pick(self, name) -> ServedModel:
        if name is None or name == "" or name in self.models:
            return self.models.get(name) or self.default
        if len(self.models) == 1 and name == getattr(self.default.python_model, "name", None):
            return self.default  # the registered model's own name
        known = ", ".join(self.models)
        raise ApiError(
            404, f"the model {name!r} is not served here; this server answers for: {known}", code="model_not_found"
        )

    async def _stream(self, send, served: ServedModel, request: dict) -> None:
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stop):
            raise ApiError(400, '"stop" must be a string or a list of strings')
        chunks = iter(await asyncio.to_thread(_start_stream, served, {**request, "stop": None}))
        first = await asyncio.to_thread(next, chunks, None)  # errors in the request come before any event
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        text, last, chunk = StreamText(stop), first, first
        try:
            while chunk is not None and not text.stopped:
                last = chunk
                piece = text.feed((chunk["choices"][0]["delta"] or {}).get("content") or "")
                if piece:
                    await self._event(send, _with_content(chunk, piece, None))
                if not text.stopped:
                    chunk = await asyncio.to_thread(next, chunks, None)
        except ApiError as exc:  # the answer had begun: the error is the stream's last event
            await self._event(send, json.loads(exc.body()))
        else:
            if rest := text.end():
                await self._event(send, _with_content(last, rest, None))
            finish = "stop" if text.stopped else (last["choices"][0].get("finish_reason") or "stop")
            await self._event(send, _with_content(last, None, finish))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        if text.stopped:  # the rest of the answer is not wanted: its generation stops at its next token
            cancel = CANCEL.get()
            if cancel is not None:
                cancel.set()
            await asyncio.to_thread(_drain, chunks)

    async def _event(self, send, chunk: dict) -> None:
        data = b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _json(self, send, status: int, payload: dict) -> None:
        await self._send(send, status, json.dumps(payload, ensure_ascii=False).encode())

    async def _send(self, send, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def parse_request(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(request, dict):
        raise ApiError(400, "the body must be a JSON object")
    if "messages" not in request:
        raise ApiError(400, '"messages" is required')
    unknown = set(request) - PASSED_ON - DROPPED
    if unknown:
        raise ApiError(
            400,
            f"unsupported fields: {', '.join(sorted(unknown))} (understood: {', '.join(sorted(PASSED_ON | DROPPED))})",
        )
    if not isinstance(request.get("stream", False), bool):
        raise ApiError(400, '"stream" must be true or false')
    return request


def _model_input(request: dict) -> dict:
    return {k: v for k, v in request.items() if k in PASSED_ON and v is not None}


def _predict(served: ServedModel, request: dict) -> dict:
    with _as_api_errors():
        answer = served.python_model.predict(None, _model_input(request))
    return {**answer, "model": served.name}


def _start_stream(served: ServedModel, request: dict):
    """The pyfunc's chunk generator; the first ``next`` starts the generation (in the caller's thread)."""
    with _as_api_errors():
        chunks = served.python_model.predict_stream(None, _model_input(request))
    return _checked(served, chunks)


def _checked(served: ServedModel, chunks):
    with _as_api_errors():
        for chunk in chunks:
            yield {**chunk, "model": served.name}


class _as_api_errors:
    """The pyfunc's refusals (MLflow's INVALID_PARAMETER_VALUE) as 400s; other failures as 500s."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (ApiError, GeneratorExit)):
            return False
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException) and exc.get_http_status_code() == 400:
            raise ApiError(400, exc.message) from None
        raise ApiError(500, f"the model failed: {type(exc).__name__}: {exc}"[:2000], "server_error") from exc


def _drain(chunks) -> None:
    try:
        for _ in chunks:
            pass
    except ApiError:
        pass


def _with_content(chunk: dict, content: str | None, finish: str | None) -> dict:
    delta = {"role": "assistant", "content": content} if content is not None else {}
    return {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def _read(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)
