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
import re
import unicodedata
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.records import StageResult, records_as_rejects
from pipeline.validate import WHITESPACE

STAGE = "dedup"
ConflictPolicy = Literal["keep_first", "keep_all", "drop"]
CONFLICT_POLICIES = ("keep_first", "keep_all", "drop")
SEP = "\x1f"  # unit separator: a control character, which validation never lets through

_WS_RUN_RE2 = f"[{WHITESPACE}]+"
_WS_RUN_PY = re.compile(f"[{WHITESPACE}]+")


def normalize_text(text: str) -> str:
    """Reference (row-at-a-time) normalisation; :func:`normalize_array` is the vectorised one."""
    return _WS_RUN_PY.sub(" ", unicodedata.normalize("NFKC", text)).strip(" ")


def normalize_array(values: pa.Array | pa.ChunkedArray | pd.Series) -> pa.ChunkedArray:
    """NFKC, whitespace runs to one space, trimmed; vectorised in Arrow."""
    arr = pa.chunked_array([pa.array(values)]) if isinstance(values, pd.Series) else values
    arr = arr.cast(pa.large_string())
    arr = pc.utf8_normalize(arr, form="NFKC")
    arr = pc.replace_substring_regex(arr, pattern=_WS_RUN_RE2, replacement=" ")
    return pc.utf8_trim(arr, characters=" ")


def _hex_digests(values: pa.ChunkedArray | pa.Array) -> list[str]:
    sha = hashlib.sha256
    return [sha(s.encode("utf-8", "surrogatepass")).hexdigest()[:32] for s in values.to_pylist()]


def stable_id(*parts: str) -> str:
    """The id :func:`deduplicate` gives to already-normalised parts (for tests and tools)."""
    return hashlib.sha256(SEP.join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _where(df: pd.DataFrame, pos: np.ndarray) -> list[str]:
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

    # 1. exact duplicates of the normalised triple: keep the first occurrence
    codes, uniques = pd.factorize(pd.Series(triple, dtype="str"), sort=False)
    _, first_of = np.unique(codes, return_index=True)  # codes are 0..k-1, so this is per code
    first = first_of[codes] if n else codes
    positions = np.arange(n)
    is_dup = first != positions
    dup_pos = np.flatnonzero(is_dup)
    reasons: dict[int, str] = {
        int(p): f"duplicate of {w} (same instruction, input and output after normalisation)"
        for p, w in zip(dup_pos, _where(frame, first[dup_pos]))
    }

    # 2. conflicts among the remaining rows: same normalised prompt, different answers
    remaining = np.flatnonzero(~is_dup)
    pcodes, _ = pd.factorize(pd.Series(prompt, dtype="str").iloc[remaining], sort=False)
    counts = np.bincount(pcodes) if len(pcodes) else np.array([], dtype=np.int64)
    in_conflict = counts[pcodes] > 1 if len(pcodes) else np.array([], dtype=bool)
    conflict_rows = remaining[in_conflict]
    conflict_groups: list[dict] = []
    if len(conflict_rows):
        group_codes = pcodes[in_conflict]
        order = np.argsort(group_codes, kind="stable")
        bounds_ = np.flatnonzero(np.diff(group_codes[order])) + 1
        for members in np.split(conflict_rows[order], bounds_):
            where = _where(frame, members)
            conflict_groups.append(
                {
                    "rows": len(members),
                    "kept": where[0] if conflict_policy == "keep_first" else ("all" if conflict_policy == "keep_all" else "none"),
                    "sources": where,
                    "prompt": str(frame.at[int(members[0]), "input"] or frame.at[int(members[0]), "instruction"])[:80],
                }
            )
            if conflict_policy == "keep_first":
                for p in members[1:]:
                    reasons[int(p)] = (
                        f"conflict: same prompt as {where[0]} but a different answer "
                        f"(conflict_policy keep_first keeps the first)"
                    )
            elif conflict_policy == "drop":
                for p in members:
                    reasons[int(p)] = (
                        f"conflict: {len(members)} rows share this prompt with different answers "
                        f"({', '.join(where[:5])}{'…' if len(where) > 5 else ''}); conflict_policy drop"
                    )

    bad = np.array(sorted(reasons), dtype=np.int64)
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[bad] = False
    rejected = records_as_rejects(frame.iloc[bad], STAGE, [reasons[int(p)] for p in bad])
    kept = frame[keep_mask].reset_index(drop=True)
    keep_idx = pa.array(np.flatnonzero(keep_mask))
    kept.insert(0, "record_id", pd.Series(_hex_digests(pc.take(triple, keep_idx)), dtype="str"))
    kept.insert(1, "prompt_id", pd.Series(_hex_digests(pc.take(prompt, keep_idx)), dtype="str"))
    stats = {
        "rows_in": n,
        "rows_kept": len(kept),
        "duplicates_removed": int(len(dup_pos)),
        "conflict_policy": conflict_policy,
        "conflict_groups": len(conflict_groups),
        "conflict_rows": int(len(conflict_rows)),
        "conflicts_rejected": int(len(bad) - len(dup_pos)),
        "conflicts": conflict_groups,
    }
    return StageResult(kept=kept, rejected=rejected, stats=stats)
