"""Stage 3 (asset ``deduplicated_records``): exact duplicates and prompt conflicts.

Normalisation (for comparison only; the stored text is left as written): Unicode NFKC, every
run of whitespace collapsed to one space, trimmed. Two rows are duplicates when their
normalised instruction, input and output are all equal; the first in source order is kept.
Rows that share an answer but differ in their prompt are different questions and both stay.

Rows whose normalised prompt (instruction + input) is equal but whose answers differ are
*conflicts*, handled by ``conflict_policy``: ``keep_first`` (default) keeps the first in source
order, ``keep_all`` keeps them all, ``drop`` rejects every row of the conflict.

Each kept row gets ``record_id`` (a stable hash of the normalised triple) and ``prompt_id``
(a stable hash of the normalised prompt), both 32 hex digits of SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.records import StageResult, records_as_rejects
from pipeline.stages.validated_records import WHITESPACE

STAGE = "dedup"
ConflictPolicy = Literal["keep_first", "keep_all", "drop"]
CONFLICT_POLICIES = ("keep_first", "keep_all", "drop")
SEP = "\x1f"  # unit separator: a control character, which validation never lets through

_WS_RUN_RE2 = f"[{WHITESPACE}]+"
_WS_RUN_PY = re.compile(f"[{WHITESPACE}]+")
# Rows the whitespace rule changes: any whitespace but a plain space, two spaces in a row, or a
# space at either end.
_WS_NEEDS_WORK = "[" + WHITESPACE.replace(" ", "") + "]|  |^ | $"
_CHUNK = 131_072


def normalize_text(text: str) -> str:
    """Reference (row-at-a-time) normalisation; :func:`normalize_array` is the vectorised one."""
    return _WS_RUN_PY.sub(" ", unicodedata.normalize("NFKC", text)).strip(" ")


# pyarrow 25's utf8_normalize never composes (its "NFKC" returns NFKD: U+00D9 comes back as
# U followed by U+0300). Rows that then hold a combining mark or a Hangul jamo are composed again
# with Python's unicodedata, which gives true NFKC; the rest (almost all) are already NFKC.
_NEEDS_COMPOSITION = r"[\p{M}\x{1100}-\x{11FF}\x{A960}-\x{A97F}\x{D7B0}-\x{D7FF}]"


def _nfkc(arr: pa.Array) -> pa.Array:
    arr = pc.utf8_normalize(arr, form="NFKC")
    needs = pc.fill_null(pc.match_substring_regex(arr, pattern=_NEEDS_COMPOSITION), False)
    if pc.any(needs).as_py():
        fixed = [None if v is None else unicodedata.normalize("NFKC", v) for v in arr.filter(needs).to_pylist()]
        arr = pc.replace_with_mask(arr, needs, pa.array(fixed, type=arr.type))
    return arr


def _normalize_chunk(arr: pa.Array) -> pa.Array:
    arr = _nfkc(arr)
    # The regex replacement is the slow part, so it runs only on rows that need it.
    needs = pc.fill_null(pc.match_substring_regex(arr, pattern=_WS_NEEDS_WORK), False)
    if pc.any(needs).as_py():
        fixed = pc.replace_substring_regex(arr.filter(needs), pattern=_WS_RUN_RE2, replacement=" ")
        arr = pc.replace_with_mask(arr, needs, pc.utf8_trim(fixed, characters=" "))
    return arr


def _normalize_plain(arr: pa.Array) -> pa.Array:
    """Arrow kernels release the GIL: large columns are normalised in chunks on every core."""
    if len(arr) <= _CHUNK or (os.cpu_count() or 1) == 1:
        return _normalize_chunk(arr)
    from concurrent.futures import ThreadPoolExecutor

    chunks = [arr.slice(i, _CHUNK) for i in range(0, len(arr), _CHUNK)]
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        parts = list(pool.map(_normalize_chunk, chunks))
    return pa.concat_arrays(parts)


def normalize_array(values: pa.Array | pa.ChunkedArray | pd.Series) -> pa.Array:
    """NFKC, whitespace runs to one space, trimmed; vectorised in Arrow.

    A column with few distinct values (an instruction shared by every row, say) is
    dictionary-encoded first, so each distinct value is normalised once.
    """
    arr = pa.array(values) if isinstance(values, pd.Series) else values
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    sample = arr.slice(0, 10_000)
    if len(arr) > 1000 and len(pc.unique(sample)) < len(sample) // 4:
        encoded = pc.dictionary_encode(arr)
        return pc.take(_normalize_plain(encoded.dictionary), encoded.indices)
    return _normalize_plain(arr)


def _digests(values: pa.Array) -> list[bytes]:
    """SHA-256 of each string's UTF-8 bytes, read straight from the Arrow buffers."""
    values = values.cast(pa.large_string())
    _validity, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[values.offset : values.offset + len(values) + 1].tolist()
    data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
    sha = hashlib.sha256
    return [sha(data[a:b]).digest() for a, b in zip(offsets[:-1], offsets[1:])]


def stable_id(*parts: str) -> str:
    """The id :func:`deduplicate` gives to already-normalised parts (for tests and tools)."""
    return hashlib.sha256(SEP.join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _where(df: pd.DataFrame, pos) -> list[str]:
    files = df["source_file"].to_numpy()
    lines = df["source_line"].to_numpy()
    return [f"{files[p]}:{lines[p]}" for p in pos]


def deduplicate(df: pd.DataFrame, conflict_policy: ConflictPolicy = "keep_first") -> StageResult:
    if conflict_policy not in CONFLICT_POLICIES:
        raise ValueError(f"conflict_policy must be one of {CONFLICT_POLICIES}, not {conflict_policy!r}")
    frame = df.reset_index(drop=True)
    n = len(frame)
    norm = {c: normalize_array(frame[c].astype("str")) for c in ("instruction", "input", "output")}
    sep = pa.scalar(SEP, pa.large_string())
    prompt = pc.binary_join_element_wise(norm["instruction"], norm["input"], sep)
    triple = pc.binary_join_element_wise(prompt, norm["output"], sep)
    prompt_d = _digests(prompt)
    triple_d = _digests(triple)
    del norm, prompt, triple

    # 1. exact duplicates of the normalised triple (same SHA-256): keep the first occurrence
    first_of: dict[bytes, int] = {}
    reasons: dict[int, str] = {}
    dup_of: list[tuple[int, int]] = []
    for i, d in enumerate(triple_d):
        j = first_of.setdefault(d, i)
        if j != i:
            dup_of.append((i, j))
    for (i, _j), w in zip(dup_of, _where(frame, [j for _i, j in dup_of])):
        reasons[i] = f"duplicate of {w} (same instruction, input and output after normalisation)"
    n_dups = len(dup_of)

    # 2. conflicts among the remaining rows: same normalised prompt, different answers
    first_prompt: dict[bytes, int] = {}
    groups: dict[bytes, list[int]] = {}  # only prompts seen more than once
    for i, d in enumerate(prompt_d):
        if i in reasons:
            continue
        j = first_prompt.setdefault(d, i)
        if j != i:
            groups.setdefault(d, [j]).append(i)
    conflict_groups: list[dict] = []
    conflict_rows = 0
    for members in groups.values():
        conflict_rows += len(members)
        where = _where(frame, members)
        conflict_groups.append(
            {
                "rows": len(members),
                "kept": where[0] if conflict_policy == "keep_first" else ("all" if conflict_policy == "keep_all" else "none"),
                "sources": where,
                "prompt": str(frame.at[members[0], "input"] or frame.at[members[0], "instruction"])[:80],
            }
        )
        if conflict_policy == "keep_first":
            for p in members[1:]:
                reasons[p] = (
                    f"conflict: same prompt as {where[0]} but a different answer "
                    f"(conflict_policy keep_first keeps the first)"
                )
        elif conflict_policy == "drop":
            for p in members:
                reasons[p] = (
                    f"conflict: {len(members)} rows share this prompt with different answers "
                    f"({', '.join(where[:5])}{'…' if len(where) > 5 else ''}); conflict_policy drop"
                )

    bad = np.array(sorted(reasons), dtype=np.int64)
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[bad] = False
    rejected = records_as_rejects(frame.iloc[bad], STAGE, [reasons[int(p)] for p in bad])
    kept = frame[keep_mask].reset_index(drop=True)
    keep_idx = np.flatnonzero(keep_mask).tolist()
    # record_id / prompt_id: the first 32 hex digits (128 bits) of the SHA-256
    kept.insert(0, "record_id", pd.Series([triple_d[i][:16].hex() for i in keep_idx], dtype="str"))
    kept.insert(1, "prompt_id", pd.Series([prompt_d[i][:16].hex() for i in keep_idx], dtype="str"))
    stats = {
        "rows_in": n,
        "rows_kept": len(kept),
        "duplicates_removed": n_dups,
        "conflict_policy": conflict_policy,
        "conflict_groups": len(conflict_groups),
        "conflict_rows": conflict_rows,
        "conflicts_rejected": len(bad) - n_dups,
        "conflicts": conflict_groups,
    }
    return StageResult(kept=kept, rejected=rejected, stats=stats)
