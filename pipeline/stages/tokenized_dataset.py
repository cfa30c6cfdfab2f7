"""Stage (asset ``tokenized_dataset``): chat-template tokenization with prompt-masked labels.

Each Alpaca row becomes one conversation in the base model's own chat template:

    system:    the configured system prompt (the same one is used at inference)
    user:      instruction + "\\n" + input   (just the instruction when input is empty)
    assistant: output

``input_ids`` = prompt tokens (the template rendered up to the generation prompt) followed by
the response tokens (the answer and the end-of-turn token, nothing after it). ``labels`` are
-100 on every prompt token, so only the answer and its end-of-turn token are supervised; the
model learns to stop. Prompt and response are tokenized separately, exactly as generation
sees them (LLaMA-Factory's ``supervised.py`` does the same).

A row longer than ``max_seq_len`` keeps its prompt and loses the end of its answer; a row whose
prompt alone does not fit is left out and listed. Results are cached under a key built from the
data fingerprint, tokenizer fingerprint, chat template, ``max_seq_len`` and system prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from pipeline.core.atomic import atomic_dir
from pipeline.core.cache import is_complete, keyed_folder
from pipeline.core.fingerprint import sha256_json

IGNORE_INDEX = -100
DEFAULT_MAX_SEQ_LEN = 2048
FORMAT_VERSION = 1
# short: every training row and evaluated prompt carries it (docs/training.md#choosing-the-defaults)
DEFAULT_SYSTEM_PROMPT = "你是一名中医药知识助手。"
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")


class TokenizerSettings(BaseModel):
    """How rows become token sequences (asset ``tokenized_dataset``)."""

    max_seq_len: int = Field(
        DEFAULT_MAX_SEQ_LEN, gt=8, description="Longest sequence in tokens; longer answers lose their end"
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System turn used in training and inference")


def user_turn(instruction: str, inp: str) -> str:
    return f"{instruction}\n{inp}" if inp else instruction


def prompt_messages(instruction: str, inp: str, system_prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_turn(instruction, inp)})
    return messages


def render_prompt(tokenizer, instruction: str, inp: str, system_prompt: str) -> str:
    """The text a model sees at inference, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(
        prompt_messages(instruction, inp, system_prompt), tokenize=False, add_generation_prompt=True
    )


def pad_token_id(tokenizer, fallback: int) -> int:
    """The tokenizer's pad token, or ``fallback`` (the end-of-turn token) where it has none: padding
    is masked out of attention and loss, so which id fills it does not matter, only that it exists."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def end_of_turn_id(tokenizer) -> int:
    """The special token the template puts right after an assistant answer (e.g. <|im_end|>)."""
    probe = "MEDTUNE_PROBE"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    suffix = text[text.rindex(probe) + len(probe) :]
    special = set(tokenizer.all_special_ids)
    for tid in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
        if tid in special:
            return int(tid)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer's chat template ends an assistant turn with no special token and has no eos token"
        )
    return int(tokenizer.eos_token_id)


@dataclass
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def tokenize_rows(
    tokenizer, instructions: list[str], inputs: list[str], outputs: list[str], system_prompt: str, max_seq_len: int
) -> list[TokenizedRow | None]:
    """Tokenize conversations; ``None`` for a row whose prompt alone exceeds ``max_seq_len``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the base model's tokenizer has no chat template")
    eot = end_of_turn_id(tokenizer)
    prompts = [render_prompt(tokenizer, i, x, system_prompt) for i, x in zip(instructions, inputs)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(list(outputs), add_special_tokens=False)["input_ids"]
    rows: list[TokenizedRow | None] = []
    for p, a in zip(prompt_ids, answer_ids):
        if len(p) >= max_seq_len:
            rows.append(None)
            continue
        response = [*a, eot]
        room = max_seq_len - len(p)
        truncated = len(response) > room
        response = response[:room]
        rows.append(
            TokenizedRow(input_ids=[*p, *response], labels=[IGNORE_INDEX] * len(p) + response, truncated=truncated)
        )
    return rows


def cache_key(
    data_fingerprint: str, tokenizer_fingerprint: str, chat_template: str, max_seq_len: int, system_prompt: str
) -> str:
    return sha256_json(
        {
            "format": FORMAT_VERSION,
            "data": data_fingerprint,
            "tokenizer": tokenizer_fingerprint,
            "template": chat_template,
            "max_seq_len": max_seq_len,
            "system_prompt": system_prompt,
        }
    )


@dataclass
class TokenizedDataset:
    path: str
    key: str
    cache_hit: bool
    stats: dict[str, Any]

    def split_path(self, split: str) -> Path:
        return Path(self.path) / f"{split}.parquet"

    def load(self, split: str) -> pd.DataFrame:
        return pd.read_parquet(self.split_path(split))

    @property
    def max_seq_len(self) -> int:
        """The length the rows were cut to (the manifest's): training reads it from here, it is not
        a setting of its own."""
        return int(json.loads((Path(self.path) / MANIFEST).read_text())["max_seq_len"])


def _stats(table: pd.DataFrame, skipped: list[str]) -> dict[str, Any]:
    lengths = table["length"].to_numpy() if len(table) else np.array([0])
    supervised = int(table["n_supervised"].sum()) if len(table) else 0
    total = int(table["length"].sum()) if len(table) else 0
    return {
        "rows": int(len(table)),
        "rows_by_split": {s: int((table["split"] == s).sum()) for s in SPLITS},
        "tokens": total,
        "supervised_tokens": supervised,
        "supervised_share": round(supervised / total, 4) if total else 0.0,
        "length_p50": float(np.percentile(lengths, 50)),
        "length_p95": float(np.percentile(lengths, 95)),
        "length_max": int(lengths.max()),
        "truncated_rows": int(table["truncated"].sum()) if len(table) else 0,
        "prompt_too_long_rows": len(skipped),
        "prompt_too_long_ids": skipped[:50],
    }


TOKENIZE_BLOCK = 2_000  # rows between progress lines


TOKENIZED_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("n_supervised", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


def tokenize_dataset(
    alpaca: pd.DataFrame,
    tokenizer,
    *,
    data_fingerprint: str,
    tokenizer_fingerprint: str,
    out_root: str | os.PathLike,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    log=None,
) -> TokenizedDataset:
    """Tokenize the Alpaca table into ``out_root/<key>/{train,eval}.parquet`` (cached by key).
    ``log``: a progress line every few seconds (rows tokenized, rows/s, time left)."""
    from pipeline.core.progress import Progress

    key = cache_key(data_fingerprint, tokenizer_fingerprint, tokenizer.chat_template, max_seq_len, system_prompt)
    dest = keyed_folder(out_root, key)
    manifest_path = dest / MANIFEST
    if is_complete(dest, MANIFEST, *(f"{s}.parquet" for s in SPLITS)):
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("key") == key:
                return TokenizedDataset(str(dest), key, True, manifest["stats"])
        except (OSError, ValueError):
            pass  # unreadable cache entry: rebuild it
    progress = Progress(log, "tokenized_dataset", len(alpaca), every=5.0)
    rows = []
    for start in range(0, len(alpaca), TOKENIZE_BLOCK):  # each row on its own: blocks only pace the progress lines
        part = alpaca.iloc[start : start + TOKENIZE_BLOCK]
        rows += tokenize_rows(
            tokenizer,
            part["instruction"].tolist(),
            part["input"].tolist(),
            part["output"].tolist(),
            system_prompt,
            max_seq_len,
        )
        progress(len(rows))
    keep = [r is not None for r in rows]
    skipped = alpaca.loc[[not k for k in keep], "record_id"].tolist()
    kept_rows = [r for r in rows if r is not None]
    table = pd.DataFrame(
        {
            "record_id": alpaca.loc[keep, "record_id"].tolist(),
            "split": alpaca.loc[keep, "split"].tolist(),
            "input_ids": [r.input_ids for r in kept_rows],
            "labels": [r.labels for r in kept_rows],
            "length": [len(r.input_ids) for r in kept_rows],
            "n_supervised": [sum(1 for t in r.labels if t != IGNORE_INDEX) for r in kept_rows],
            "truncated": [r.truncated for r in kept_rows],
        }
    )
    stats = _stats(table, skipped)
    manifest = {
        "key": key,
        "format": FORMAT_VERSION,
        "data_fingerprint": data_fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "max_seq_len": max_seq_len,
        "system_prompt": system_prompt,
        "chat_template": tokenizer.chat_template,
        "end_of_turn_id": end_of_turn_id(tokenizer),
        "ignore_index": IGNORE_INDEX,
        "stats": stats,
    }
    arrow = pa.table({name: table[name].tolist() for name in TOKENIZED_SCHEMA.names}, schema=TOKENIZED_SCHEMA)
    with atomic_dir(dest) as tmp:
        for split in SPLITS:
            part = arrow.filter(pc.equal(arrow["split"], split))
            pq.write_table(part, tmp / f"{split}.parquet", compression="zstd")
        (tmp / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2))
    return TokenizedDataset(str(dest), key, False, stats)
