"""The second pass of ``deduplicated_records``: each chunk's rows out, kept with their ids (row,
prompt, near-duplicate group) or rejected with the reason, and the stage's figures."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.records import records_as_rejects
from pipeline.stages.deduplicated_records import near
from pipeline.stages.deduplicated_records.keys import SEP, hex_ids, normalize_text
from pipeline.stages.deduplicated_records.sources import Sources

STAGE = "dedup"


def _dup_reason(where: str) -> str:
    return f"duplicate of {where} (same instruction, input and output after normalisation)"


def _norm_prompt(frame: pd.DataFrame, r: int) -> str:
    return normalize_text(str(frame.at[r, "instruction"])) + SEP + normalize_text(str(frame.at[r, "input"]))


def _near_shown(frame: pd.DataFrame, offset: int, groups: list[dict]) -> None:
    """The listed near-duplicate groups' first prompt and how similar their rows are (exact Jaccard
    of the shingles, the lowest against the first row), as their rows go by."""
    for g in groups:
        for m in [m for m in g["_members"] if offset <= m < offset + len(frame)]:
            r = m - offset
            if m == g["_head"]:
                g["prompt"] = str(frame.at[r, "input"] or frame.at[r, "instruction"])[:80]
                g["_text"] = _norm_prompt(frame, r)
            else:
                j = round(near.jaccard(g["_text"], _norm_prompt(frame, r)), 3)
                g["similarity"] = j if g["similarity"] is None else min(g["similarity"], j)


def chunk_output(
    frame: pd.DataFrame,
    offset: int,
    triple: np.ndarray,
    prompt: np.ndarray,
    dups: tuple[np.ndarray, np.ndarray],
    reasons: dict[int, str],
    counts: dict,
    sources: Sources,
    heads: dict[int, dict],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One chunk's kept rows (with ``record_id``, ``prompt_id`` and ``near_group_id``) and rejected rows."""
    n = len(frame)
    rows = np.arange(offset, offset + n)
    keep = counts["kept"][offset : offset + n]
    for head in [h for h in heads if offset <= h < offset + n]:
        r = head - offset
        heads[head]["prompt"] = str(frame.at[r, "input"] or frame.at[r, "instruction"])[:80]
    _near_shown(frame, offset, counts["near"]["groups"])
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
    grouped, group_head = counts["near"]["grouped"]
    at = np.minimum(np.searchsorted(grouped, idx), max(len(grouped) - 1, 0))
    split_row = np.where(grouped[at] == idx, group_head[at], idx) if len(grouped) else idx
    out["near_group_id"] = pd.Series(hex_ids(prompt[split_row]), dtype="str")
    return out, rejected


def dedup_stats(n: int, kept_rows: int, counts: dict, conflict_policy: str, groups: list[dict], buckets: dict) -> dict:
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
        "near_duplicate_policy": counts["near"]["policy"],
        "near_duplicate_threshold": counts["near"]["threshold"],
        "near_duplicate_groups": counts["near"]["near_duplicate_groups"],
        "near_duplicate_rows": counts["near"]["near_duplicate_rows"],
        "near_duplicates_rejected": counts["near"]["near_duplicates_rejected"],
        "near_duplicates": [{k: v for k, v in g.items() if not k.startswith("_")} for g in counts["near"]["groups"]],
        "prompt_buckets": buckets,
    }


class SplitBuckets:
    """The smallest and largest split bucket of the kept prompts (``alpaca_dataset`` needs them
    to keep one prompt in each split), gathered chunk by chunk."""

    def __init__(self, distinct: int) -> None:
        self.lo = self.hi = None
        self.distinct = distinct

    def add(self, prompt_ids: pd.Series) -> None:
        from pipeline.stages.deduplicated_records.keys import bucket

        if len(prompt_ids):
            b = bucket(prompt_ids)
            self.lo = b.min() if self.lo is None else min(self.lo, b.min())
            self.hi = b.max() if self.hi is None else max(self.hi, b.max())

    def stats(self) -> dict:
        return {
            "min": None if self.lo is None else float(self.lo),
            "max": None if self.hi is None else float(self.hi),
            "distinct_prompts": self.distinct,
        }
