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

:func:`deduplicate_to` streams: a first pass over the rows keeps only each row's two 128-bit
keys (``keys.py``) and its file and line, the decisions are made on those arrays (sorted, so
exact dedup fits any number of rows), a second pass writes the rows out.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import pandas as pd

from pipeline.core.chunks import CHUNK_ROWS
from pipeline.core.pool import map_batches, read_batch, workers_for
from pipeline.core.records import StagedRows, StageResult, empty_records, records_as_rejects, stage_output
from pipeline.stages.deduplicated_records.keys import SEP, chunk_keys, hex_ids, normalize_array, normalize_text, stable_id

__all__ = ["CONFLICT_POLICIES", "SEP", "chunk_keys", "decide", "deduplicate", "deduplicate_to", "first_of_group",
           "hex_ids", "normalize_array", "normalize_text", "stable_id"]

STAGE = "dedup"
ConflictPolicy = Literal["keep_first", "keep_all", "drop"]
CONFLICT_POLICIES = ("keep_first", "keep_all", "drop")


def first_of_group(keys: np.ndarray) -> np.ndarray:
    """For each row, the position of the first row (in order) with the same key. A stable sort
    keeps equal keys in row order, so each run's first element is its earliest row."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # written for a small peak: a few arrays of 8 bytes a row at a time, reused in place
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    half = np.take(keys[:, 0], order)
    np.not_equal(half[1:], half[:-1], out=starts[1:])
    np.take(keys[:, 1], order, out=half)
    starts[1:] |= half[1:] != half[:-1]
    del half
    run = np.arange(n, dtype=np.int64)
    run[~starts] = 0
    del starts
    np.maximum.accumulate(run, out=run)
    np.take(order, run, out=run)
    first = np.empty(n, dtype=np.int64)
    first[order] = run
    return first


class Sources:
    """``file:line`` of any row seen so far, from compact arrays (a file number and a line per row)."""

    def __init__(self, n: int) -> None:
        self.files: list[str] = []
        self._ids: dict[str, int] = {}
        self.file_ids = np.zeros(n, dtype=np.int32)
        self.lines = np.zeros(n, dtype=np.int64)

    def add(self, frame: pd.DataFrame, offset: int = 0) -> None:
        self.add_codes(*source_codes(frame), offset)

    def add_codes(self, files: list[str], codes: np.ndarray, lines: np.ndarray, offset: int) -> None:
        mapping = np.array([self._ids.setdefault(f, len(self._ids)) for f in files], dtype=np.int32)
        self.files = list(self._ids)
        if len(codes):
            self.file_ids[offset : offset + len(codes)] = mapping[codes]
            self.lines[offset : offset + len(codes)] = lines

    def where(self, rows) -> list[str]:
        return [f"{self.files[self.file_ids[r]]}:{self.lines[r]}" for r in rows]


def source_codes(frame: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A chunk's files (each once), each row's file as a number into them, and its line."""
    codes, uniques = pd.factorize(frame["source_file"].astype("str"), sort=False)
    return list(uniques), codes.astype(np.int32), frame["source_line"].to_numpy(dtype=np.int64)


def _keys_batch(path: str, index: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """In a worker: the first pass on batch ``index`` of ``path`` (keys and sources, 44 bytes a row)."""
    frame = read_batch(path, index)
    return (*chunk_keys(frame), *source_codes(frame))


def decide(triple: np.ndarray, prompt: np.ndarray, sources: Sources, conflict_policy: ConflictPolicy) -> tuple[dict[int, str], np.ndarray, list[dict], dict]:
    """Which rows go, and why: ``(reasons by row, (duplicate rows, the first row of each one's
    triple), conflict groups, counts)``. Works on the keys alone, so any number of rows fits in memory."""
    n = len(triple)
    first = first_of_group(triple)
    is_dup = first != np.arange(n)
    n_dups = int(is_dup.sum())
    # only the duplicates' first rows are needed later (a few percent of the rows)
    dup_rows = np.flatnonzero(is_dup)
    dups = (dup_rows, first[dup_rows])
    del first
    # conflicts among the remaining rows: same normalised prompt, different answers
    rest = np.flatnonzero(~is_dup)
    pfirst = rest[first_of_group(prompt[rest])] if len(rest) else rest
    repeated = pfirst != rest  # not the first of its prompt
    members: dict[int, list[int]] = {}
    for row, head in zip(rest[repeated].tolist(), pfirst[repeated].tolist()):
        members.setdefault(head, [head]).append(row)
    reasons: dict[int, str] = {}
    groups: list[dict] = []
    conflict_rows = 0
    # in the order each group's second row appears (as rows are read)
    for head, rows in sorted(members.items(), key=lambda kv: kv[1][1]):
        conflict_rows += len(rows)
        where = sources.where(rows)
        groups.append({
            "rows": len(rows),
            "kept": where[0] if conflict_policy == "keep_first" else ("all" if conflict_policy == "keep_all" else "none"),
            "sources": where,
            "prompt": "",  # filled in from the first row's text as the rows are written
            "_head": head,
        })
        if conflict_policy == "keep_first":
            for p in rows[1:]:
                reasons[p] = (f"conflict: same prompt as {where[0]} but a different answer "
                              f"(conflict_policy keep_first keeps the first)")
        elif conflict_policy == "drop":
            for p in rows:
                reasons[p] = (f"conflict: {len(rows)} rows share this prompt with different answers "
                              f"({', '.join(where[:5])}{'…' if len(where) > 5 else ''}); conflict_policy drop")
    kept = np.ones(n, dtype=bool)
    kept[is_dup] = False
    kept[list(reasons)] = False
    counts = {"duplicates_removed": n_dups, "conflict_groups": len(groups), "conflict_rows": conflict_rows,
              "conflicts_rejected": len(reasons), "kept": kept,
              "distinct_prompts": int(len(np.unique(pfirst[kept[rest]])))}
    return reasons, dups, groups, counts


def _dup_reason(where: str) -> str:
    return f"duplicate of {where} (same instruction, input and output after normalisation)"


def _chunk_output(frame: pd.DataFrame, offset: int, triple: np.ndarray, prompt: np.ndarray, dups: tuple[np.ndarray, np.ndarray],
                  reasons: dict[int, str], kept: np.ndarray, sources: Sources, heads: dict[int, dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One chunk's kept rows (with ``record_id`` and ``prompt_id``) and rejected rows."""
    n = len(frame)
    rows = np.arange(offset, offset + n)
    keep = kept[offset : offset + n]
    for head in [h for h in heads if offset <= h < offset + n]:
        r = head - offset
        heads[head]["prompt"] = str(frame.at[r, "input"] or frame.at[r, "instruction"])[:80]
    bad = rows[~keep]
    dup_rows, dup_heads = dups
    at = np.minimum(np.searchsorted(dup_rows, bad), max(len(dup_rows) - 1, 0))
    hit = dup_rows[at] == bad if len(dup_rows) else np.zeros(len(bad), dtype=bool)
    dup_first = np.where(hit, dup_heads[at] if len(dup_rows) else bad, bad)
    dup_where = sources.where(dup_first[dup_first != bad].tolist())
    it = iter(dup_where)
    why = [_dup_reason(next(it)) if f != b else reasons[int(b)] for b, f in zip(bad.tolist(), dup_first.tolist())]
    rejected = records_as_rejects(frame.iloc[bad - offset], STAGE, why)
    out = frame[keep].reset_index(drop=True)
    idx = rows[keep]
    out.insert(0, "record_id", pd.Series(hex_ids(triple[idx]), dtype="str"))
    out.insert(1, "prompt_id", pd.Series(hex_ids(prompt[idx]), dtype="str"))
    return out, rejected


def _stats(n: int, kept_rows: int, counts: dict, conflict_policy: str, groups: list[dict], buckets: dict) -> dict:
    return {
        "rows_in": n,
        "rows_kept": kept_rows,
        "rows_rejected": n - kept_rows,
        "duplicates_removed": counts["duplicates_removed"],
        "conflict_policy": conflict_policy,
        "conflict_groups": counts["conflict_groups"],
        "conflict_rows": counts["conflict_rows"],
        "conflicts_rejected": counts["conflicts_rejected"],
        "conflicts": [{k: v for k, v in g.items() if k != "_head"} for g in groups],
        "prompt_buckets": buckets,
    }


def _check_policy(conflict_policy: str) -> None:
    if conflict_policy not in CONFLICT_POLICIES:
        raise ValueError(f"conflict_policy must be one of {CONFLICT_POLICIES}, not {conflict_policy!r}")


class _Buckets:
    """The smallest and largest split bucket of the kept prompts (``alpaca_dataset`` needs them
    to keep one prompt in each split), gathered chunk by chunk."""

    def __init__(self, distinct: int) -> None:
        self.lo = self.hi = None
        self.distinct = distinct

    def add(self, prompt_ids: pd.Series) -> None:
        from pipeline.stages.alpaca_dataset import bucket

        if len(prompt_ids):
            b = bucket(prompt_ids)
            self.lo = b.min() if self.lo is None else min(self.lo, b.min())
            self.hi = b.max() if self.hi is None else max(self.hi, b.max())

    def stats(self) -> dict:
        return {"min": None if self.lo is None else float(self.lo), "max": None if self.hi is None else float(self.hi),
                "distinct_prompts": self.distinct}


def deduplicate(df: pd.DataFrame, conflict_policy: ConflictPolicy = "keep_first") -> StageResult:
    """Exact duplicates removed and conflicts handled, in memory (:func:`deduplicate_to` streams)."""
    _check_policy(conflict_policy)
    frame = df.reset_index(drop=True)
    triple, prompt = chunk_keys(frame)
    sources = Sources(len(frame))
    sources.add(frame)
    reasons, dups, groups, counts = decide(triple, prompt, sources, conflict_policy)
    heads = {g["_head"]: g for g in groups}
    kept, rejected = _chunk_output(frame, 0, triple, prompt, dups, reasons, counts["kept"], sources, heads)
    buckets = _Buckets(counts["distinct_prompts"])
    buckets.add(kept["prompt_id"])
    stats = _stats(len(frame), len(kept), counts, conflict_policy, groups, buckets.stats())
    return StageResult(kept=kept, rejected=rejected, stats=stats)


def deduplicate_to(rows: StagedRows, folder: str | os.PathLike, conflict_policy: ConflictPolicy = "keep_first",
                   chunk_rows: int = CHUNK_ROWS, workers: int | None = None) -> StagedRows:
    """:func:`deduplicate`, streamed in two passes over ``rows``: the first keeps only each row's
    two 128-bit keys and its source (44 bytes a row), computed on 2,000,000 rows or more by one
    worker process per core (``workers`` sets how many); the second writes the rows out."""
    _check_policy(conflict_policy)
    n = rows.n_kept
    triple = np.empty((n, 2), dtype=np.uint64)  # filled in place: no second copy when joining chunks
    prompt = np.empty((n, 2), dtype=np.uint64)
    sources = Sources(n)
    offset = 0
    n_workers = workers_for(n, workers)
    if n_workers == 1:
        firsts = ((*chunk_keys(chunk), *source_codes(chunk)) for chunk in rows.iter_kept(chunk_rows))
    else:
        firsts = map_batches(rows.kept_path, _keys_batch, (), n_workers)
    for t, p, files, codes, lines in firsts:
        triple[offset : offset + len(t)] = t
        prompt[offset : offset + len(t)] = p
        sources.add_codes(files, codes, lines, offset)
        offset += len(t)
    if offset != n:
        raise RuntimeError(f"{rows.kept_path} holds {offset} rows, its stage said {n}")
    reasons, dups, groups, counts = decide(triple, prompt, sources, conflict_policy)
    heads = {g["_head"]: g for g in groups}
    buckets = _Buckets(counts["distinct_prompts"])
    offset = 0
    empty = empty_records()
    empty.insert(0, "record_id", pd.Series([], dtype="str"))
    empty.insert(1, "prompt_id", pd.Series([], dtype="str"))
    with stage_output(folder, empty, chunk_rows) as out:
        for chunk in rows.iter_kept(chunk_rows):
            kept, rejected = _chunk_output(chunk, offset, triple, prompt, dups, reasons, counts["kept"], sources, heads)
            out.kept.write(kept)
            out.rejected.write(rejected)
            buckets.add(kept["prompt_id"])
            offset += len(chunk)
        out.stats = _stats(offset, out.kept.rows, counts, conflict_policy, groups, buckets.stats())
        out.stats["workers"] = n_workers
    return StagedRows(str(folder), out.stats)
