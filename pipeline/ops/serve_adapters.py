"""Several adapters over one base model in one server: ``make serve ADAPTERS="champion challenger 3"``.

As vLLM's ``--enable-lora`` and LoRAX do on GPUs: the base weights are loaded once and each adapter
is attached to them under its own name (peft's multi-adapter ``load_adapter``); a request's
``model`` picks one (``medtune@champion``, ``medtune/3``, ``sweep:<sweep>.<trial>``, an adapter
folder's name), and the server switches to it for that answer. One adapter is active at a time, so
answers run one after another (on a CPU, generations side by side only split the cores anyway).

An adapter is named as ``make serve`` names a model (``champion``, ``challenger``, a version,
``NAME@alias``, ``models:/NAME/3``), or ``sweep:<sweep>.<trial>``, or a folder. A registered
version's adapter is its training's (the run's ``medtune.adapter_id``), read from
``models/adapters/`` when this machine trained it, else downloaded from the run's ``adapter``
artifacts. The adapters must share a base model; each keeps the system prompt it was trained with.
Served on OpenAI's ``/v1`` routes (``openai_api.py``) behind the same limits.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.stages.lora_adapter.spec import TRAINING_RECORD
from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, MANIFEST

SWEEP_PREFIX = "sweep:"


class AdapterError(ValueError):
    """An adapter that cannot be served: the message says why."""


@dataclass(frozen=True)
class AdapterSource:
    name: str  # what a request gives as ``model``
    folder: str  # the adapter's files
    base: str  # the base model folder it was trained on
    system_prompt: str


def _trained_with(folder: Path) -> tuple[str | None, str]:
    """(base model folder, system prompt) from the adapter's training record, else its peft config."""
    record = folder / TRAINING_RECORD
    if record.is_file():
        spec = json.loads(record.read_text())["spec"]
        manifest = Path(spec.get("tokenized_path") or "") / MANIFEST
        prompt = json.loads(manifest.read_text())["system_prompt"] if manifest.is_file() else DEFAULT_SYSTEM_PROMPT
        return spec.get("base_model_path"), prompt
    config = json.loads((folder / "adapter_config.json").read_text())
    return config.get("base_model_name_or_path"), DEFAULT_SYSTEM_PROMPT


def from_folder(folder: Path, name: str) -> AdapterSource:
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{folder} holds no adapter (no adapter_config.json)")
    base, prompt = _trained_with(folder)
    if not base or not Path(base).is_dir():
        raise AdapterError(f"the base model of adapter {name} ({base}) is not a folder on this machine")
    return AdapterSource(name, str(folder), str(Path(base).resolve()), prompt)


def resolve_adapter(ref: str, tracking_uri: str, data_root) -> AdapterSource:
    """What ``ref`` names (see the module docstring), as an adapter folder with its base."""
    if ref.startswith(SWEEP_PREFIX):
        sweep, _, label = ref[len(SWEEP_PREFIX) :].partition(".")
        record = data_root.root / "sweeps" / sweep / "trials" / f"{label}.json"
        if not record.is_file():
            raise AdapterError(f"no trial {label!r} in sweep {sweep!r} ({record} missing)")
        return from_folder(Path(json.loads(record.read_text())["adapter_path"]), ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return from_folder(path.resolve(), path.resolve().name)
    return _registered_adapter(ref, tracking_uri, data_root)


def _registered_adapter(ref: str, tracking_uri: str, data_root) -> AdapterSource:
    from mlflow.tracking import MlflowClient

    from pipeline.ops.serve import REGISTERED_NAME, ServeError, resolve

    try:
        served = resolve(ref, tracking_uri, data_root.models_dir / "served")
    except ServeError as exc:
        raise AdapterError(str(exc)) from None
    if not served.run_id:
        raise AdapterError(f"{ref} is not a registered version: give a version, an alias or a folder")
    client = MlflowClient(tracking_uri)
    aid = client.get_run(served.run_id).data.tags.get("medtune.adapter_id")
    if not aid or not re.fullmatch(r"[\w.-]+", aid):
        raise AdapterError(f"{served.label}'s training run {served.run_id} names no adapter")
    local = data_root.models_dir / "adapters" / aid
    if not (local / "adapter_config.json").is_file():
        local = data_root.models_dir / "served" / "adapters" / aid
        if not (local / "adapter_config.json").is_file():
            import mlflow

            local.parent.mkdir(parents=True, exist_ok=True)
            got = mlflow.artifacts.download_artifacts(
                run_id=served.run_id,
                artifact_path="adapter",
                dst_path=str(local.parent / f".{aid}"),
                tracking_uri=tracking_uri,
            )
            Path(got).rename(local)
    name = served.name if "@" in served.name or "/" in served.name else f"{REGISTERED_NAME}/{served.name}"
    return from_folder(local, name)


class AdapterChat:
    """One adapter's chat model over the shared base: switches to it for each answer, one at a time."""

    def __init__(self, chat, peft_model, adapter: str, lock: threading.Lock):
        self.chat, self.model, self.adapter, self.lock = chat, peft_model, adapter, lock
        self.name, self.tokenizer = chat.name, chat.tokenizer

    @property
    def max_new_tokens(self) -> int:
        return self.chat.max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        self.chat.max_new_tokens = value

    def predict(self, context, model_input, params=None):
        with self.lock:
            self.model.set_adapter(self.adapter)
            return self.chat.predict(context, model_input, params)

    def predict_stream(self, context, model_input, params=None):
        with self.lock:  # held from the first chunk to the last (released when the stream is closed)
            self.model.set_adapter(self.adapter)
            yield from self.chat.predict_stream(context, model_input, params)


def load_adapters(sources: list[AdapterSource], max_new_tokens: int = 256) -> list:
    """The base model once, every adapter on it; one ``openai_api.ServedModel`` per adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.ops.openai_api import ServedModel
    from pipeline.stages.registered_model.serving import MedTuneChatModel
    from pipeline.stages.tokenized_dataset import end_of_turn_id

    bases = {s.base for s in sources}
    if len(bases) != 1:
        raise AdapterError(
            f"the adapters were trained on different base models ({', '.join(sorted(bases))}): serve them apart"
        )
    if len({s.name for s in sources}) != len(sources):
        raise AdapterError("two adapters have the same name")
    (base_path,) = bases
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(
        sources[0].folder if (Path(sources[0].folder) / "tokenizer_config.json").is_file() else base_path
    )
    tokenizer.padding_side = "left"
    generation = base.generation_config
    generation.eos_token_id = end_of_turn_id(tokenizer)  # as the merged export's: the answer ends with its turn
    if generation.pad_token_id is None:
        generation.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else generation.eos_token_id
        )
    names = [f"adapter_{i}" for i in range(len(sources))]
    model = PeftModel.from_pretrained(base, sources[0].folder, adapter_name=names[0])
    for source, name in zip(sources[1:], names[1:]):
        model.load_adapter(source.folder, adapter_name=name)
    model.eval()
    lock = threading.Lock()
    served = []
    for source, name in zip(sources, names):
        chat = MedTuneChatModel()
        chat.system_prompt, chat.max_new_tokens, chat.name = source.system_prompt, max_new_tokens, source.name
        chat.model, chat.generation_config, chat.tokenizer = model, generation, tokenizer
        served.append(ServedModel(source.name, AdapterChat(chat, model, name, lock)))
    return served


async def no_mlflow_path(scope, receive, send):
    """MLflow's paths in adapter mode: ``/ping`` and ``/health`` answer; the others point to ``/v1``
    (an MLflow scoring server holds one model)."""
    if scope["type"] != "http":
        return
    with contextlib.suppress(Exception):
        while (await receive()).get("more_body"):
            pass
    status, payload = (
        404,
        {
            "error_code": "NOT_FOUND",
            "message": "this server serves several adapters: POST /v1/chat/completions with the adapter's name as "
            "model (GET /v1/models lists them)",
        },
    )
    if scope["path"] in ("/ping", "/health"):
        status, payload = 200, {"status": "ok"}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
