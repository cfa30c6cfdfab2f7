"""Ask the models a question:
``python -m pipeline.ask "咳嗽，咽喉肿痛，该用什么中成药？" --model base --model champion``
(``make ask Q="..." MODELS="base champion"``). The question may also come on stdin.

``--model`` (repeatable; default ``base`` and ``champion``, or ``base`` and the newest adapter
when nothing is registered) names:

* ``base``: the pipeline's base model; ``merged``: the last merged model;
* an adapter id (or a unique prefix of one) from ``models/adapters/``;
* a registry version or alias: ``champion``, ``challenger``, ``medtune@champion``,
  ``models:/medtune@champion``, ``models:/medtune/3`` (its adapter, over its base: the merged
  model answers the same, checked when it was exported).

The base model is loaded once: adapters of one kind on it are attached with ``load_adapter`` and
switched with ``set_adapter``; the base answers with the adapters switched off. (Adapters of
another peft kind, prompt-learning adapters and full fine-tunes load apart.) Answers are greedy
in the training chat template and system prompt, streamed as they are generated, then shown
side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.secrets import redact
from pipeline.stages.lora_adapter.spec import TRAINING_RECORD
from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, MANIFEST

REGISTERED_NAME = "medtune"


class AskError(ValueError):
    """A model name that names nothing: the message says what is available."""


@dataclass
class Target:
    name: str  # as the user wrote it
    kind: str  # base | adapter | model (a full fine-tune or a merged model: a plain folder)
    path: str  # the adapter or model folder (the base folder for "base")
    base_path: str | None
    system_prompt: str
    method: str | None = None


def _system_prompt(tokenized_path: str | None) -> str:
    manifest = Path(tokenized_path or "") / MANIFEST
    return (
        json.loads(manifest.read_text())["system_prompt"]
        if tokenized_path and manifest.is_file()
        else DEFAULT_SYSTEM_PROMPT
    )


def _stage(root, name: str) -> dict | None:
    path = root.stages_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def available_adapters(root) -> list[tuple[str, str]]:
    """(adapter id, method) of every finished training, newest first."""
    folder = root.models_dir / "adapters"
    done = [p for p in folder.iterdir() if (p / TRAINING_RECORD).is_file()] if folder.is_dir() else []
    done.sort(key=lambda p: (p / TRAINING_RECORD).stat().st_mtime, reverse=True)
    return [(p.name, json.loads((p / TRAINING_RECORD).read_text())["spec"].get("method", "lora")) for p in done]


def _adapter(root, wanted: str, name: str) -> Target:
    ids = available_adapters(root)
    matches = [i for i, _ in ids if i.startswith(wanted)]
    if len(matches) != 1:
        listing = ", ".join(f"{i} ({m})" for i, m in ids[:20]) or "none: train one with `make run`"
        what = "matches several adapters" if matches else "is no adapter id"
        raise AskError(f"{name!r} {what}; adapters in {root.models_dir / 'adapters'}: {listing}")
    folder = root.models_dir / "adapters" / matches[0]
    spec = json.loads((folder / TRAINING_RECORD).read_text())["spec"]
    method = spec.get("method", "lora")
    return Target(
        name,
        "model" if method == "full" else "adapter",
        str(folder),
        spec["base_model_path"],
        _system_prompt(spec.get("tokenized_path")),
        method,
    )


def _registered(root, tracking_uri: str, model: str, ref: str, name: str) -> Target:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from resources.mlflow_tracking import MlflowTracking, TrackingUnavailable

    try:  # a quick look first: MLflow's own client retries an unreachable database for minutes
        MlflowTracking(tracking_uri=tracking_uri).check_reachable(timeout=5)
    except TrackingUnavailable as exc:
        raise AskError(f"{name!r}: {exc}") from None
    version = None
    try:
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)  # a database store connects here
        version = (
            client.get_model_version(model, ref) if ref.isdigit() else client.get_model_version_by_alias(model, ref)
        )
    except MlflowException:
        pass  # no such version or alias: said below, with what exists
    except Exception as exc:  # the store itself: a database or server that does not answer
        first = redact(exc).strip().splitlines()[0][:300]
        raise AskError(f"{name!r}: the MLflow store {redact(tracking_uri)} cannot be reached ({first})") from None
    if version is None:
        try:
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{model}'"))
            aliases = client.get_registered_model(model).aliases or {}
        except MlflowException:
            versions, aliases = [], {}
        named = {int(v): sorted(a for a, av in aliases.items() if int(av) == int(v)) for v in versions}
        listing = ", ".join(f"version {v}" + (f" ({', '.join(named[v])})" if named[v] else "") for v in versions)
        raise AskError(
            f"{name!r}: registered model {model!r} has no {'version' if ref.isdigit() else 'alias'} {ref!r} "
            f"in {redact(tracking_uri)}; it has: {listing or 'nothing registered yet (run `make run`)'}"
        ) from None
    adapter_id = (version.tags or {}).get("medtune.adapter_id")
    if not adapter_id:
        raise AskError(f"{name!r}: version {version.version} of {model!r} names no adapter (tag medtune.adapter_id)")
    return _adapter(root, adapter_id, name)


def resolve(name: str, root, tracking_uri: str) -> Target:
    """What ``--model NAME`` names (see the module's docstring), or :class:`AskError` saying what exists."""
    if name == "base":
        info = _stage(root, "base_model")
        tokenized = _stage(root, "tokenized_dataset")
        if not info:
            raise AskError("no base model materialized yet: run `make run` (or name an adapter)")
        return Target(name, "base", info["path"], info["path"], _system_prompt(tokenized and tokenized.get("path")))
    if name == "merged":
        merged = _stage(root, "merged_model")
        if not merged or not merged.get("path"):
            raise AskError(
                "no merged model yet"
                + (
                    f" ({merged['reason']})"
                    if merged and merged.get("reason")
                    else ": materialize merged_model (`make run`)"
                )
            )
        target = _adapter(root, merged["adapter_id"], name)
        return Target(name, "model", merged["path"], None, target.system_prompt, target.method)
    if name in ("champion", "challenger"):
        return _registered(root, tracking_uri, REGISTERED_NAME, name, name)
    m = re.fullmatch(r"(?:models:/)?([\w.-]+)(?:@([\w-]+)|/(\d+))", name)
    if m:
        return _registered(root, tracking_uri, m.group(1), m.group(2) or m.group(3), name)
    if re.fullmatch(r"[0-9a-f]{4,64}", name):
        return _adapter(root, name, name)
    listing = ", ".join(i for i, _ in available_adapters(root)[:10]) or "none yet"
    raise AskError(
        f"unknown model {name!r}: give base, merged, champion, challenger, a registry alias (medtune@champion) "
        f"or version (models:/medtune/3), or an adapter id (available: {listing})"
    )


class Models:
    """The models to ask, each base loaded once; ``use(target)`` makes the target the active one."""

    def __init__(self, dtype="float32", device: str = "cpu"):
        import torch

        self.dtype = getattr(torch, dtype)
        self.device = device
        self.bases: dict[str, object] = {}  # base path -> plain model or the PeftModel on it
        self.peft_type: dict[str, str] = {}  # base path -> peft type of its adapters
        self.apart: dict[str, object] = {}  # target path -> a model loaded on its own
        self.tokenizers: dict[str, object] = {}

    def _load(self, path: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, use_safetensors=True).to(self.device).eval()

    def add(self, t: Target) -> None:
        from transformers import AutoTokenizer

        from pipeline.stages.lora_adapter.inference import load_trained
        from pipeline.stages.lora_adapter.methods import is_prompt_learning

        self.tokenizers[t.path] = AutoTokenizer.from_pretrained(t.path)
        if t.kind == "model":
            self.apart[t.path] = self._load(t.path)
            return
        if t.kind == "base":
            if self.bases.get(t.path) is None:
                self.bases[t.path] = self._load(t.path)
            return
        kind = json.loads((Path(t.path) / "adapter_config.json").read_text())["peft_type"]
        held = self.bases.get(t.base_path)
        if is_prompt_learning(t.method) or (held is not None and self.peft_type.get(t.base_path, kind) != kind):
            self.apart[t.path] = load_trained(t.base_path, t.path, dtype=self.dtype, device=self.device)[0]
            return
        from peft import PeftModel

        if held is None or not isinstance(held, PeftModel):
            base = held if held is not None else self._load(t.base_path)
            self.bases[t.base_path] = PeftModel.from_pretrained(base, t.path, adapter_name=Path(t.path).name).eval()
        else:
            held.load_adapter(t.path, adapter_name=Path(t.path).name)
        self.peft_type[t.base_path] = kind

    @contextlib.contextmanager
    def use(self, t: Target):
        """The model that answers as ``t``."""
        if t.path in self.apart:
            yield self.apart[t.path]
            return
        held = self.bases[t.base_path]
        if t.kind == "base":
            if hasattr(held, "disable_adapter"):
                with held.disable_adapter():
                    yield held
            else:
                yield held
            return
        held.set_adapter(Path(t.path).name)
        yield held


def answer(model, tokenizer, question: str, system_prompt: str, max_new_tokens: int, stream=None) -> str:
    import torch

    from pipeline.stages.lora_adapter.generation import stop_token_ids
    from pipeline.stages.tokenized_dataset import render_prompt

    prompt = render_prompt(tokenizer, question, "", system_prompt)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    stops = stop_token_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=stops[0],
            streamer=stream,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def side_by_side(names: list[str], answers: list[str], width: int = 100) -> str:
    col = max(20, width // max(1, len(names)) - 3)
    wrapped = [textwrap.wrap(a, col) or [""] for a in answers]
    lines = [" | ".join(n.ljust(col)[:col] for n in names), "-+-".join("-" * col for _ in names)]
    for i in range(max(len(w) for w in wrapped)):
        lines.append(" | ".join((w[i] if i < len(w) else "").ljust(col) for w in wrapped))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Ask MedTune's models a question (see `python -m pipeline.ask --help`)",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("question", nargs="?", help="the question (default: read stdin)")
    ap.add_argument(
        "--model",
        "-m",
        action="append",
        help="base, merged, champion, challenger, an adapter id, medtune@ALIAS, models:/medtune/N (repeatable)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--no-stream", action="store_true", help="print the answers only when all are done")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    question = args.question if args.question else sys.stdin.read()
    if not question.strip():
        ap.error("no question: give it as an argument or on stdin")

    from resources.data_root import DataRoot, default_data_dir
    from resources.mlflow_tracking import default_tracking_uri

    root = DataRoot(path=args.data_dir or default_data_dir())
    uri = default_tracking_uri()
    names = args.model or ["base", "champion"]
    try:
        targets = [resolve(n, root, uri) for n in names]
    except AskError as exc:
        if args.model or "champion" not in str(exc) and "registered" not in str(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        newest = available_adapters(root)[:1]  # nothing registered yet: the newest adapter
        if not newest:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        targets = [resolve("base", root, uri), resolve(newest[0][0], root, uri)]
    from transformers import TextStreamer

    models = Models()
    for t in targets:
        models.add(t)
    answers = []
    for t in targets:
        tokenizer = models.tokenizers[t.path]
        label = (
            t.name if t.kind == "base" or t.name == Path(t.path).name else f"{t.name} ({Path(t.path).name}, {t.method})"
        )
        if not args.no_stream:
            print(f"\n=== {label}", flush=True)
        stream = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with models.use(t) as model:
            answers.append(answer(model, tokenizer, question.strip(), t.system_prompt, args.max_new_tokens, stream))
    if len(targets) > 1 or args.no_stream:
        print("\n" + side_by_side([t.name for t in targets], answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
