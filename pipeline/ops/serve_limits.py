"""The limits ``make serve`` puts in front of MLflow's scoring server: an ASGI wrapper around the
app ``mlflow.pyfunc.scoring_server.init`` builds, run by this process's own uvicorn.

On ``POST /invocations`` and ``POST /v1/chat/completions``, in this order:

- a body over ``max_body`` bytes: 413 (read no further than the limit);
- ``max_tokens`` above the limit the request timeout is sized for: 400 naming both;
- at most ``concurrency`` generations at once and ``queue`` requests waiting for one; beyond them,
  or a wait that reaches the timeout: 503 with ``Retry-After`` (one answer's time);
- an answer still generating at the timeout, or whose client went away: its generation is stopped
  at the next token (a stopping criterion that reads the request's cancel flag), its slot freed,
  and the client (if still there) gets a 503 that says so, or, if its answer is streaming, an
  error event that ends the stream. Never a 504 after which work goes on.

Errors come in the shape of the path's API: MLflow's ``{"error_code", "message"}``, OpenAI's
``{"error": {...}}`` under ``/v1``. Other paths (``/ping``, ``/health``, ``/version``) pass straight through.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import os
import threading
import time
from dataclasses import dataclass

# the request's cancel flag: asyncio.to_thread copies it into the thread that generates
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("medtune_cancel", default=None)
LIMITED_PATHS = ("/invocations", "/v1/chat/completions")


def default_concurrency() -> int:
    """One generation per 4 cores: each uses all of torch's threads, so more at once only split them."""
    return max(1, (os.cpu_count() or 1) // 4)


@dataclass(frozen=True)
class Limits:
    timeout_s: float  # from the request's arrival to its answer, queue included
    max_tokens: int  # the longest answer the timeout is sized for
    max_body: int = 1 << 20
    concurrency: int = 1
    queue: int = 2

    @property
    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one answer's time (the timeout is three)."""
        return max(1, math.ceil(self.timeout_s / 3))


def stop_on_cancel(model) -> None:
    """Make ``model`` (a pyfunc's model) stop generating when the current request's cancel flag is set.

    Done here, around ``generate``, rather than in the logged pyfunc: models registered before this
    server existed carry their own copy of the pyfunc and get the same limit."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __init__(self, event: threading.Event):
            self.event = event

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    original = model.generate

    def generate(*args, stopping_criteria=None, **kwargs):
        event = CANCEL.get()
        if event is not None:
            stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), Cancelled(event)])
        return original(*args, stopping_criteria=stopping_criteria, **kwargs)

    model.generate = generate


def requested_tokens(body: bytes) -> list[int]:
    """The ``max_tokens`` values a JSON body asks for (chat fields or ``params``); none if unreadable."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []  # MLflow answers malformed bodies itself
    if not isinstance(data, dict):
        return []
    places = [data, data.get("params") if isinstance(data.get("params"), dict) else {}]
    found = [p.get(k) for p in places for k in ("max_tokens", "max_completion_tokens")]
    return [v for v in found if isinstance(v, int) and not isinstance(v, bool)]


class LimitedApp:
    """ASGI middleware: see the module docstring. ``stats`` counts answers by status."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self.slots = asyncio.Semaphore(limits.concurrency)
        self.waiting = 0
        self.stats: dict[int, int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in LIMITED_PATHS or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        arrived = time.monotonic()
        send = _Shaped(send, scope["path"])
        body = await self._body(scope, receive)
        if body is None:
            return await self._refuse(
                send,
                413,
                "BAD_REQUEST",
                f"the request body is over this server's limit of {self.limits.max_body} bytes",
            )
        over = [n for n in requested_tokens(body) if n > self.limits.max_tokens]
        if over:
            return await self._refuse(
                send,
                400,
                "INVALID_PARAMETER_VALUE",
                f'"max_tokens" {over[0]} is above this server\'s limit of {self.limits.max_tokens} '
                f"(its request timeout of {self.limits.timeout_s:.0f} s is sized for that many new tokens)",
            )
        if self.slots.locked() and self.waiting >= self.limits.queue:
            return await self._busy(send, "busy: every generation slot is taken and the queue is full")
        self.waiting += 1
        try:
            await asyncio.wait_for(
                self.slots.acquire(), timeout=max(0.0, self.limits.timeout_s - (time.monotonic() - arrived))
            )
        except TimeoutError:
            return await self._busy(
                send, f"busy: no generation slot came free within the request timeout of {self.limits.timeout_s:.0f} s"
            )
        finally:
            self.waiting -= 1
        try:
            await self._answer(scope, receive, send, body, arrived)
        finally:
            self.slots.release()

    async def _answer(self, scope, receive, send, body: bytes, arrived: float) -> None:
        cancel, gone, replied, unread = threading.Event(), asyncio.Event(), {"started": False}, [body]

        async def replay():
            if unread:
                return {"type": "http.request", "body": unread.pop(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def forward(message):
            if cancel.is_set():
                return  # the client was already answered, or has gone
            if message["type"] == "http.response.start":
                replied["started"] = True
                self._count(message["status"])
            await send(message)

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        token = CANCEL.set(cancel)
        try:
            inner = asyncio.ensure_future(self.app(scope, replay, forward))
        finally:
            CANCEL.reset(token)
        watcher = asyncio.ensure_future(watch())
        remaining = max(0.0, self.limits.timeout_s - (time.monotonic() - arrived))
        await asyncio.wait({inner, watcher}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if not inner.done():
            cancel.set()  # the generation stops at its next token
            said = (
                f"the answer took longer than the request timeout of {self.limits.timeout_s:.0f} s; "
                "its generation was stopped"
            )
            if not gone.is_set() and not replied["started"]:
                await self._busy(send, said)
            elif not gone.is_set():  # a streamed answer: its last event says why it ends
                event = json.dumps(
                    {"error": {"message": said, "type": "server_error", "param": None, "code": "timeout"}}
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                        "more_body": False,
                    }
                )
            gone.set()
            await asyncio.gather(inner, return_exceptions=True)  # hold the slot until the thread is done
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        inner.result()

    async def _body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it passes the limit (by its Content-Length, or as it arrives)."""
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.limits.max_body:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body:
                return None
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _busy(self, send, message: str) -> None:
        await self._refuse(
            send,
            503,
            "TEMPORARILY_UNAVAILABLE",
            f"{message}; retry after {self.limits.retry_after} s",
            self.limits.retry_after,
        )

    async def _refuse(self, send, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        """An error in the shape of the path's API (MLflow's ``{"error_code", "message"}`` or OpenAI's)."""
        self._count(status)
        if getattr(send, "path", "").startswith("/v1/"):
            from pipeline.ops.openai_api import error_body

            payload = error_body(status, message)
        else:
            payload = json.dumps({"error_code": code, "message": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _count(self, status: int) -> None:
        self.stats[status] = self.stats.get(status, 0) + 1


class _Shaped:
    """``send``, knowing the request's path (which API's error shape to answer in)."""

    def __init__(self, send, path: str):
        self.send, self.path = send, path

    async def __call__(self, message):
        await self.send(message)


def build_app(model, limits: Limits, name: str = "medtune"):
    """MLflow's scoring app for a loaded pyfunc with OpenAI's routes beside it (``name``: the model's
    name there), behind ``limits``; MLflow's own 504 timeout set beyond ours."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    from pipeline.ops.openai_api import ServedModel

    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(math.ceil(limits.timeout_s) + 60)
    return serve_models(scoring_server.init(model), [ServedModel(name, model.unwrap_python_model())], limits)


def serve_models(app, served: list, limits: Limits) -> LimitedApp:
    """``served`` (``openai_api.ServedModel``) on OpenAI's routes, other paths to ``app``, all behind
    ``limits``: each model's default answer length capped to what the timeout is sized for, and its
    generation stopped by the request's cancel flag."""
    from pipeline.ops.openai_api import OpenAIRoutes

    stopped = set()
    for one in served:
        python_model = one.python_model
        if getattr(python_model, "max_new_tokens", 0) > limits.max_tokens:
            python_model.max_new_tokens = limits.max_tokens  # a request without max_tokens fits the timeout too
        if id(python_model.model) not in stopped:  # adapters over one base share its generate
            stop_on_cancel(python_model.model)
            stopped.add(id(python_model.model))
    return LimitedApp(OpenAIRoutes(app, served), limits)
