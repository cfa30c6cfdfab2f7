"""Stage 3 (asset ``deduplicated_records``): exact duplicates and prompt conflicts.

Normalisation (for comparison only; the stored text is left as written): Unicode NFKC, every
run of whitespace collapsed to one space, trimmed. Two rows are duplicates when their
normalised instruction, input and output are all equal; the first in source order is kept.
Rows that share an answer but differ in their prompt are different questions and both stay.

Rows whose normalised prompt (instruction + input) is equal but whose answers differ are
*conflicts*, handled by ``conflict_policy``: ``keep_first`` (default) keeps the first in source
order, ``keep_all`` keeps them all, ``drop`` rejects every row of the conflict.

Prompts that are not equal but near (MinHash LSH on character shingles, ``near.py``) form
*near-duplicate groups*, handled by ``near_duplicate_policy``: ``report`` (default) keeps them and
lists them, ``drop`` keeps the rows with each group's first prompt and rejects the others. Kept
rows carry ``near_group_id``, the ``prompt_id`` of their group's first row (their own when they are
in no group), which ``alpaca_dataset`` splits by, so a group never straddles train and eval.

Each kept row gets ``record_id`` (a stable hash of the normalised triple) and ``prompt_id``
(a stable hash of the normalised prompt), both 32 hex digits of SHA-256.

:func:`deduplicate_to` streams: a first pass over the rows keeps only each row's two 128-bit
keys (``keys.py``) and its file and line, the decisions are made on those arrays (sorted, so
exact dedup fits any number of rows), a second pass writes the rows out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from pipeline.core.chunks import CHUNK_ROWS
from pipeline.core.pool import map_batches, read_batch, workers_for
from pipeline.core.records import StagedRows, StageResult, empty_records, in_memory, stage_output
from pipeline.stages.deduplicated_records import minhash, near
from pipeline.stages.deduplicated_records.keys import (
    SEP,
    chunk_keys,
    first_of_group,
    hex_ids,
    normalize_array,
    normalize_text,
    prompt_keys,
    stable_id,
)
from pipeline.stages.deduplicated_records.output import SplitBuckets, chunk_output, dedup_stats
from pipeline.stages.deduplicated_records.sources import Sources, source_codes

__all__ = [
    "CONFLICT_POLICIES",
    "NEAR_POLICIES",
    "SEP",
    "chunk_keys",
    "decide",
    "deduplicate",
    "deduplicate_to",
    "first_of_group",
    "hex_ids",
    "normalize_array",
    "normalize_text",
    "stable_id",
]

ConflictPolicy = Literal["keep_first", "keep_all", "drop"]
CONFLICT_POLICIES = ("keep_first", "keep_all", "drop")
NearPolicy = Literal["report", "drop"]
NEAR_POLICIES = ("report", "drop")
NEAR_THRESHOLD = 0.85  # Jaccard of character bigrams; see docs/data.md for how it was chosen


class DedupSettings(BaseModel):
    """What counts as a duplicate or a conflict, and what is done with it (asset ``deduplicated_records``)."""

    conflict_policy: Literal["keep_first", "keep_all", "drop"] = Field(
        "keep_first",
        description="Rows with the same prompt but different answers: keep the first, keep all, or drop all",
    )
    near_duplicate_policy: Literal["report", "drop"] = Field(
        "report",
        description="Prompts that differ only slightly (MinHash LSH): report the groups and keep every row "
        "(alpaca_dataset keeps each group in one split), or drop all but the first prompt of each group",
    )
    near_duplicate_threshold: float = Field(
        NEAR_THRESHOLD,
        gt=0.0,
        lt=1.0,
        description="Jaccard similarity of the prompts' character bigrams (punctuation and spacing ignored) "
        "at which MinHash LSH calls two prompts near duplicates",
    )


def first_pass(frame: pd.DataFrame, threshold: float) -> tuple:
    """A chunk's keys, LSH band keys, sketches and sources: ``(triple, prompt, bands, sketches, files,
    file codes, lines)``."""
    triple, prompt, text = prompt_keys(frame)
    sig, has = minhash.signatures(text)
    bands = minhash.band_keys(sig, has, *minhash.lsh_bands(threshold))
    return (triple, prompt, bands, near.sketch(sig), *source_codes(frame))


def _first_pass_batch(path: str, index: int, threshold: float) -> tuple:
    """In a worker: the first pass on batch ``index`` of ``path`` (what it sends back: 44 bytes a
    row, 4 per band and 64 of sketch)."""
    return first_pass(read_batch(path, index), threshold)


def conflict_decisions(
    members: dict[int, list[int]], sources: Sources, conflict_policy: ConflictPolicy
) -> tuple[dict[int, str], list[dict], int]:
    """Rows sharing a prompt with different answers (``members``: first row -> its rows): the rows
    the policy rejects with their reasons, each group's summary, and the rows in conflict."""
    reasons: dict[int, str] = {}
    groups: list[dict] = []
    conflict_rows = 0
    # in the order each group's second row appears (as rows are read)
    for head, rows in sorted(members.items(), key=lambda kv: kv[1][1]):
        conflict_rows += len(rows)
        where = sources.where(rows)
        groups.append(
            {
                "rows": len(rows),
                "kept": where[0]
                if conflict_policy == "keep_first"
                else ("all" if conflict_policy == "keep_all" else "none"),
                "sources": where,
                "prompt": "",  # filled in from the first row's text as the rows are written
                "_head": head,
            }
        )
        if conflict_policy == "keep_first":
            for p in rows[1:]:
                reasons[p] = (
                    f"conflict: same prompt as {where[0]} but a different answer (conflict_policy keep_first "
                    "keeps the first)"
                )
        elif conflict_policy == "drop":
            for p in rows:
                reasons[p] = (
                    f"conflict: {len(rows)} rows share this prompt with different answers "
                    f"({', '.join(where[:5])}{'…' if len(where) > 5 else ''}); conflict_policy drop"
                )
    return reasons, groups, conflict_rows


def decide(
    triple: np.ndarray,
    prompt: np.ndarray,
    sources: Sources,
    conflict_policy: ConflictPolicy,
    bands: np.ndarray,
    sketches: near.Sketches,
    near_policy: NearPolicy = "report",
    threshold: float = NEAR_THRESHOLD,
) -> tuple[dict[int, str], np.ndarray, list[dict], dict]:
    """Which rows go, and why: ``(reasons by row, (duplicate rows, the first row of each one's
    triple), conflict groups, counts)``; ``counts["near"]`` holds the near-duplicate groups and the
    grouped rows kept. Works on the keys alone, so any number of rows fits in memory."""
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
    reasons, groups, conflict_rows = conflict_decisions(members, sources, conflict_policy)
    kept = np.ones(n, dtype=bool)
    kept[is_dup] = False
    kept[list(reasons)] = False
    n_conflicts = len(reasons)
    near_reasons, grouped, near_groups, near_counts = near.near_decisions(
        bands, sketches, prompt, kept, sources.where, near_policy, threshold
    )
    kept[list(near_reasons)] = False
    reasons.update(near_reasons)
    # what alpaca_dataset splits by: a prompt's first row, or its near group's first row
    split_of = np.arange(n, dtype=np.int64)
    split_of[rest] = pfirst
    split_of[grouped[0]] = grouped[1]
    counts = {
        "duplicates_removed": n_dups,
        "conflict_groups": len(groups),
        "conflict_rows": conflict_rows,
        "conflicts_rejected": n_conflicts,
        "kept": kept,
        "distinct_prompts": int(len(near.distinct_rows(split_of[kept]))),
        "near": {
            "grouped": grouped,
            "groups": near_groups,
            "policy": near_policy,
            "threshold": threshold,
            **near_counts,
        },
    }
    return reasons, dups, groups, counts


def _check_policy(conflict_policy: str, near_policy: str, threshold: float) -> None:
    if conflict_policy not in CONFLICT_POLICIES:
        raise ValueError(f"conflict_policy must be one of {CONFLICT_POLICIES}, not {conflict_policy!r}")
    if near_policy not in NEAR_POLICIES:
        raise ValueError(f"near_duplicate_policy must be one of {NEAR_POLICIES}, not {near_policy!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"near_duplicate_threshold must be between 0 and 1, not {threshold}")


def deduplicate(
    df: pd.DataFrame,
    conflict_policy: ConflictPolicy = "keep_first",
    near_duplicate_policy: NearPolicy = "report",
    near_duplicate_threshold: float = NEAR_THRESHOLD,
) -> StageResult:
    """Exact duplicates removed, conflicts and near duplicates handled, in memory: the asset's own
    :func:`deduplicate_to` over a temporary folder (one code path)."""
    _check_policy(conflict_policy, near_duplicate_policy, near_duplicate_threshold)
    with in_memory(
        deduplicate_to,
        df,
        conflict_policy=conflict_policy,
        near_duplicate_policy=near_duplicate_policy,
        near_duplicate_threshold=near_duplicate_threshold,
    ) as result:
        return result


def deduplicate_to(
    rows: StagedRows,
    folder: str | os.PathLike,
    conflict_policy: ConflictPolicy = "keep_first",
    chunk_rows: int = CHUNK_ROWS,
    workers: int | None = None,
    near_duplicate_policy: NearPolicy = "report",
    near_duplicate_threshold: float = NEAR_THRESHOLD,
    log=None,
) -> StagedRows:
    """:func:`deduplicate`, streamed in two passes over ``rows``: the first keeps only each row's
    two 128-bit keys, its source and its LSH band keys (44 bytes a row and 4 a band; the sketches
    that check candidate pairs, 64 bytes a row, go to a file beside ``folder``, deleted after), computed on 2,000,000
    rows or more by one worker process per core (``workers`` sets how many); the second writes the
    rows out. ``log``: a progress line every few seconds in each pass (rows done, rows/s, time left)."""
    from pipeline.core.progress import Progress

    _check_policy(conflict_policy, near_duplicate_policy, near_duplicate_threshold)
    n = rows.n_kept
    triple = np.empty((n, 2), dtype=np.uint64)  # filled in place: no second copy when joining chunks
    prompt = np.empty((n, 2), dtype=np.uint64)
    bands = np.empty((n, minhash.lsh_bands(near_duplicate_threshold)[0]), dtype=np.uint32)
    sources = Sources(n)
    offset = 0
    started = time.perf_counter()
    n_workers = workers_for(n, workers)
    if n_workers == 1:
        firsts = (first_pass(chunk, near_duplicate_threshold) for chunk in rows.iter_kept(chunk_rows))
    else:
        firsts = map_batches(rows.kept_path, _first_pass_batch, (near_duplicate_threshold,), n_workers)
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    first = Progress(log, "deduplicated_records: keys and sketches", n, every=5.0)
    with near.Sketches(Path(folder).parent / f".{Path(folder).name}.{os.getpid()}.sketches") as sketches:
        for t, p, b, sk, files, codes, lines in firsts:
            triple[offset : offset + len(t)] = t
            prompt[offset : offset + len(t)] = p
            bands[offset : offset + len(t)] = b
            sketches.add(sk)
            sources.add_codes(files, codes, lines, offset)
            offset += len(t)
            first(offset)
        if offset != n:
            raise RuntimeError(f"{rows.kept_path} holds {offset} rows, its stage said {n}")
        clock = {"first_pass": time.perf_counter() - started}
        reasons, dups, groups, counts = decide(
            triple, prompt, sources, conflict_policy, bands, sketches, near_duplicate_policy, near_duplicate_threshold
        )
    del bands
    heads = {g["_head"]: g for g in groups}
    buckets = SplitBuckets(counts["distinct_prompts"])
    offset = 0
    empty = empty_records()
    empty.insert(0, "record_id", pd.Series([], dtype="str"))
    empty.insert(1, "prompt_id", pd.Series([], dtype="str"))
    empty["near_group_id"] = pd.Series([], dtype="str")
    clock["decide"] = time.perf_counter() - started - clock["first_pass"]
    second = Progress(log, "deduplicated_records: writing", n, every=5.0)
    with stage_output(folder, empty, chunk_rows) as out:
        for chunk in rows.iter_kept(chunk_rows):
            kept, rejected = chunk_output(chunk, offset, triple, prompt, dups, reasons, counts, sources, heads)
            out.kept.write(kept)
            out.rejected.write(rejected)
            buckets.add(kept["near_group_id"])
            offset += len(chunk)
            second(offset)
        out.stats = dedup_stats(offset, out.kept.rows, counts, conflict_policy, groups, buckets.stats())
        out.stats["workers"] = n_workers
        clock["write"] = time.perf_counter() - started - clock["first_pass"] - clock["decide"]
        out.stats["seconds"] = {k: round(v, 2) for k, v in clock.items()}
    return StagedRows(str(folder), out.stats)
