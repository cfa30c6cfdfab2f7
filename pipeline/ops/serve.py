"""Serve a registered model (or a merged folder) over HTTP with MLflow's own scoring server:
``make serve`` (``MODEL=models:/medtune@champion PORT=5077``), or

    python -m pipeline.ops.serve --model champion --port 5077

``--model`` names ``champion``, ``challenger``, a version number, ``NAME@alias``, any
``models:/`` URI, an MLflow model folder, or a merged model folder (``data/models/merged/<id>``: it
is wrapped as the same pyfunc once, under ``models/served/``). The server is MLflow's scoring app
for the loaded model, behind the limits of ``serve_limits.py`` (body size, ``max_tokens``,
generations at once, a short queue, a timeout that stops the generation), run by uvicorn in this
process on 127.0.0.1 unless ``--host`` says otherwise.

The request timeout (MLflow's default is 60 s) comes from the model's measured speed on this
machine: one short greedy answer is generated before the server starts, and a request of
``--max-tokens`` new tokens is given three times what that speed predicts (at least 60 s);
``--timeout`` sets it instead. Requests (``docs/serving.md``): OpenAI's API under ``/v1``
(``openai_api.py``: ``base_url="http://127.0.0.1:5077/v1"``, ``model="medtune@champion"``, streaming
too), or MLflow's ``/invocations`` with the chat-completions schema ``{"messages": [...],
"max_tokens": 64}`` or ``{"inputs": ["question", ...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.atomic import atomic_dir
from pipeline.core.fingerprint import sha256_json
from pipeline.core.secrets import redact
from pipeline.ops.serve_limits import Limits, build_app, default_concurrency
from pipeline.ops.serve_traces import TraceTarget, trace_answers
from pipeline.stages.lora_adapter.spec import TRAINING_RECORD
from pipeline.stages.merged_model import read_export_record
from pipeline.stages.registered_model import CHALLENGER, CHAMPION, pyfunc_model_kwargs
from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, MANIFEST

REGISTERED_NAME = "medtune"
SAMPLE_QUESTION = "咳嗽，咽喉肿痛，用什么中成药？"
PROBE_TOKENS = 16


class ServeError(ValueError):
    """A model that cannot be served: the message says what exists."""


@dataclass
class Served:
    uri: str  # what mlflow.pyfunc.load_model gets
    label: str  # what the user is told
    name: str = "medtune"  # what an OpenAI client gives as ``model``
    run_id: str | None = None  # a registered version's training run
    model_id: str | None = None  # the logged model a registered version points at


def _registered(client, name: str, ref: str, tracking_uri: str) -> Served:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
    except MlflowException:
        try:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            versions = []
        what = ", ".join(f"version {v}" for v in versions) or "nothing registered yet (run `make run`)"
        raise ServeError(
            f"registered model {name!r} has no {'version' if ref.isdigit() else 'alias'} {ref!r} in "
            f"{redact(tracking_uri)}; it has: {what}"
        ) from None
    aliases = sorted(version.aliases or [])
    shown = f"{name} version {version.version}" + (f" ({', '.join(aliases)})" if aliases else "")
    short = f"{name}/{ref}" if ref.isdigit() else f"{name}@{ref}"
    source = version.source or ""
    model_id = getattr(version, "model_id", None) or (
        source[len("models:/") :] if source.startswith("models:/m-") else None
    )
    return Served(f"models:/{short}", shown, short, version.run_id, model_id)


def merged_system_prompt(folder: Path) -> str:
    """The system prompt the merged model was trained with (its adapter's tokenized data), else the default."""
    record = read_export_record(folder) or {}
    training = Path(record.get("adapter_path") or "") / TRAINING_RECORD
    if record.get("adapter_path") and training.is_file():
        tokenized = json.loads(training.read_text())["spec"].get("tokenized_path")
        manifest = Path(tokenized or "") / MANIFEST
        if tokenized and manifest.is_file():
            return json.loads(manifest.read_text())["system_prompt"]
    return DEFAULT_SYSTEM_PROMPT


def wrap_merged_folder(folder: Path, served_root: Path, max_new_tokens: int) -> Path:
    """The pyfunc the registry would hold for this merged folder, saved once (keyed by the folder's
    export record, or its weights' sizes and times) under ``served_root``."""
    import mlflow

    record = read_export_record(folder)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    key = sha256_json(
        {
            "folder": str(folder.resolve()),
            "merged_id": (record or {}).get("merged_id"),
            "weights": weights,
            "max": max_new_tokens,
        }
    )[:16]
    dest = served_root / key
    if (dest / "MLmodel").is_file():
        return dest
    kwargs = pyfunc_model_kwargs(
        {"model": str(folder)},
        system_prompt=merged_system_prompt(folder),
        max_new_tokens=max_new_tokens,
        model_name=folder.name,
    )
    with atomic_dir(dest) as tmp:
        shutil.rmtree(tmp)  # save_model wants to create its folder
        mlflow.pyfunc.save_model(str(tmp), **kwargs)
    return dest


def resolve(model: str, tracking_uri: str, served_root: Path, max_new_tokens: int = 256) -> Served:
    """What ``--model`` names, as something ``mlflow models serve -m`` takes (see the module docstring)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return Served(str(path.resolve()), f"MLflow model folder {path}", path.resolve().name)
        if (path / "config.json").is_file() and list(path.glob("*.safetensors")):
            wrapped = wrap_merged_folder(path.resolve(), served_root, max_new_tokens)
            return Served(str(wrapped), f"merged model folder {path}", path.resolve().name)
        raise ServeError(
            f"{path} is neither an MLflow model folder (MLmodel) nor a model folder (config.json and *.safetensors)"
        )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if model in (CHAMPION, CHALLENGER) or model.isdigit():
        return _registered(client, REGISTERED_NAME, model, tracking_uri)
    m = re.fullmatch(r"(?:models:/)?([\w.-]+)(?:@([\w-]+)|/(\d+))", model)
    if m:
        return _registered(client, m.group(1), m.group(2) or m.group(3), tracking_uri)
    raise ServeError(
        f"unknown model {model!r}: give champion, challenger, a version number, NAME@alias, models:/NAME/3, or a folder"
    )


def load(uri: str):
    """(the loaded pyfunc, load seconds)."""
    import mlflow

    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    return model, time.perf_counter() - start


def seconds_per_token(predict) -> float:
    """Seconds per new token of a short greedy answer on this machine (``predict(request, params)``)."""
    start = time.perf_counter()
    answer = predict({"messages": [{"role": "user", "content": SAMPLE_QUESTION}]}, {"max_tokens": PROBE_TOKENS})
    elapsed = time.perf_counter() - start
    new = int(answer["usage"]["completion_tokens"]) if isinstance(answer, dict) else PROBE_TOKENS
    return elapsed / max(1, new)


def request_timeout(max_tokens: int, per_token: float) -> int:
    """Three times what ``max_tokens`` new tokens take at the measured speed, at least 60 s."""
    return max(60, math.ceil(3 * max_tokens * per_token) + 10)


def trace_target(served: Served | None, tracking_uri: str, redact: bool) -> TraceTarget:
    """The experiment of the version's training run (else ``medtune-serving``) and its logged model."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if served is not None and served.run_id:
        experiment_id = client.get_run(served.run_id).info.experiment_id
    else:
        found = client.get_experiment_by_name("medtune-serving")
        experiment_id = found.experiment_id if found else client.create_experiment("medtune-serving")
    if served is None:  # several adapters: each trace's request names its adapter
        return TraceTarget(experiment_id, None, {}, redact)
    return TraceTarget(experiment_id, served.model_id, {"medtune.served": served.name}, redact)


def loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=f"models:/{REGISTERED_NAME}@{CHAMPION}")
    ap.add_argument("--host", default="127.0.0.1", help="the address to bind: loopback unless --allow-remote")
    ap.add_argument(
        "--allow-remote", action="store_true", help="bind a non-loopback --host: the server has no authentication"
    )
    ap.add_argument("--port", type=int, default=5077)
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="the longest answer the timeout is sized for (and a merged folder's default)",
    )
    ap.add_argument(
        "--timeout", type=int, default=None, help="request timeout in seconds (default: from the measured speed)"
    )
    ap.add_argument(
        "--concurrency", type=int, default=default_concurrency(), help="generations at once (default: one per 4 cores)"
    )
    ap.add_argument(
        "--queue", type=int, default=None, help="requests waiting for a generation slot (default: twice --concurrency)"
    )
    ap.add_argument("--max-body", type=int, default=1 << 20, help="the largest request body in bytes")
    ap.add_argument(
        "--adapters",
        nargs="*",
        default=[],
        help="several adapters over one base instead of --model: versions, aliases, sweep:<sweep>.<trial>, folders",
    )
    ap.add_argument(
        "--trace",
        choices=["off", "on", "1", "redacted"],
        default="off",
        help="each answer an MLflow trace (redacted: figures kept, the questions' and answers' text not)",
    )
    return ap


def refused_host(args) -> bool:
    """A host other machines reach: refused without --allow-remote, else a warning."""
    if not loopback(args.host):
        if not args.allow_remote:
            print(
                f"make serve: --host {args.host} is reachable from other machines and the server has no "
                "authentication; "
                "pass --allow-remote to do it anyway, behind a reverse proxy that authenticates (docs/serving.md)",
                file=sys.stderr,
            )
            return True
        print(
            f"WARNING: serving on {args.host} without authentication: anyone who reaches it can use the model",
            file=sys.stderr,
            flush=True,
        )
    return False


@dataclass
class Loaded:
    """What the server will answer for: a label, the names requests give, and how to build its app."""

    label: str
    names: list[str]
    load_seconds: float
    predict: object  # (request, params) -> answer: the first model's, to measure its speed
    build: object  # (limits) -> the ASGI app
    python_models: list = field(default_factory=list)  # what --trace wraps
    served: Served | None = None  # the one registered or folder model (not in adapter mode)


def load_one(args, tracking_uri: str) -> Loaded:
    from resources.data_root import DataRoot, default_data_dir

    served = resolve(args.model, tracking_uri, DataRoot(path=default_data_dir()).models_dir / "served", args.max_tokens)
    model, seconds = load(served.uri)
    return Loaded(
        served.label,
        [served.name],
        seconds,
        lambda request, params: model.predict(request, params=params),
        lambda limits: build_app(model, limits, served.name),
        [model.unwrap_python_model()],
        served,
    )


def load_several(args, tracking_uri: str) -> Loaded:
    from pipeline.ops.serve_adapters import load_adapters, no_mlflow_path, resolve_adapter
    from pipeline.ops.serve_limits import serve_models
    from resources.data_root import DataRoot, default_data_dir

    root = DataRoot(path=default_data_dir())
    refs = [r for part in args.adapters for r in re.split(r"[,\s]+", part) if r]
    start = time.perf_counter()
    served = load_adapters([resolve_adapter(r, tracking_uri, root) for r in refs], args.max_tokens)
    first = served[0].python_model
    return Loaded(
        f"{len(served)} adapters over one base ({', '.join(s.name for s in served)})",
        [s.name for s in served],
        time.perf_counter() - start,
        lambda request, params: first.predict(None, {**request, **params}),
        lambda limits: serve_models(no_mlflow_path, served, limits),
        [s.python_model for s in served],
    )


def main(argv: list[str] | None = None) -> int:
    from pipeline.ops.serve_adapters import AdapterError
    from resources.mlflow_tracking import default_tracking_uri

    args = parser().parse_args(argv)
    if refused_host(args):
        return 2
    # MLflow's advice to add type hints to predict: the input is checked by the wrapper on purpose (docs/serving.md)
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
    tracking_uri = default_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # models:/ URIs here and in the server resolve in this store
    try:
        loaded = load_several(args, tracking_uri) if args.adapters else load_one(args, tracking_uri)
    except (ServeError, AdapterError) as e:
        print(f"make serve: {e}", file=sys.stderr)
        return 2
    timeout = args.timeout
    if timeout is None:
        per_token = seconds_per_token(loaded.predict)
        timeout = request_timeout(args.max_tokens, per_token)
        print(
            f"{loaded.label}: loads in {loaded.load_seconds:.1f} s, {1 / per_token:.1f} new tokens/s here "
            f"(one question, greedy); request timeout {timeout} s (3x a {args.max_tokens}-token answer, at least 60 s)",
            flush=True,
        )
    if args.trace != "off":
        target = trace_target(loaded.served, tracking_uri, redact=args.trace == "redacted")
        for python_model in loaded.python_models:
            trace_answers(python_model, target)
        print(f"tracing every answer to MLflow experiment {target.experiment_id} ({args.trace})", flush=True)
    limits = Limits(
        timeout_s=timeout,
        max_tokens=args.max_tokens,
        max_body=args.max_body,
        concurrency=max(1, args.concurrency),
        queue=2 * max(1, args.concurrency) if args.queue is None else max(0, args.queue),
    )
    print(started_message(args, loaded, limits), flush=True)
    import uvicorn

    uvicorn.run(loaded.build(limits), host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    if args.trace != "off":
        import mlflow

        mlflow.flush_trace_async_logging()  # the last answers' traces, still queued at shutdown
    return 0


def started_message(args, loaded: Loaded, limits: Limits) -> str:
    base = f"http://{args.host}:{args.port}"
    sample = {"messages": [{"role": "user", "content": SAMPLE_QUESTION}], "max_tokens": min(64, limits.max_tokens)}
    lines = [
        f"limits: {limits.concurrency} generation(s) at once, {limits.queue} waiting, max_tokens {limits.max_tokens}, "
        f"body {limits.max_body} bytes; beyond: 503 with Retry-After {limits.retry_after} s",
        f"serving {loaded.label} on {base}/invocations and {base}/v1 (Ctrl-C stops it); try:"
        if loaded.served is not None
        else f"serving {loaded.label} on {base}/v1 (Ctrl-C stops it); try:",
    ]
    if loaded.served is not None:
        lines.append(
            f"  curl -s {base}/invocations -H 'Content-Type: application/json' "
            f"-d '{json.dumps(sample, ensure_ascii=False, separators=(',', ':'))}'"
        )
    lines.append(
        f"OpenAI API: base_url {base}/v1, model {' or '.join(repr(n) for n in loaded.names)} "
        "(POST /v1/chat/completions, stream true for server-sent events; GET /v1/models)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
