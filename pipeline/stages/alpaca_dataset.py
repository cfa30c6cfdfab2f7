"""Stage 4 (asset ``alpaca_dataset``): the train/eval split and the Alpaca-format Parquet file.

The split is a function of the normalised prompt alone (``prompt_id``): a prompt's bucket is
the first 64 bits of its hash as a fraction of 2**64; below ``eval_fraction`` it is eval.
So adding rows never moves an existing prompt, and rows sharing a prompt share a split. Prompts
in one near-duplicate group (``near_group_id`` from ``deduplicated_records``) all take the bucket
of the group's first prompt, so no held-out prompt has a near twin in train. With two or more
distinct prompts (groups) and ``eval_fraction`` > 0, at least one is eval (the one with the
smallest bucket) and at least one is train (the largest).

The file is written with fixed settings (zstd, fixed row-group size, no index), so the same
rows give a byte-identical file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from pipeline.core.atomic import atomic_path
from pipeline.core.chunks import CHUNK_ROWS, PARQUET_SETTINGS, ROW_GROUP_SIZE, ChunkWriter, iter_chunks, to_arrow
from pipeline.stages.deduplicated_records.keys import bucket

ALPACA_COLUMNS = ("record_id", "prompt_id", "instruction", "input", "output", "split", "source_file", "source_line")


class SplitSettings(BaseModel):
    """The train/eval split's settings (asset ``alpaca_dataset``)."""

    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation")


@dataclass(frozen=True)
class AlpacaDataset:
    """What ``alpaca_dataset`` hands on: the run's Parquet file, its rows by split, its sha256."""

    path: str
    rows: int
    train: int
    eval: int
    data_fingerprint: str
    near_duplicate_threshold: float | None = None


def split_rule(
    b: np.ndarray, eval_fraction: float, lowest: float | None, highest: float | None, distinct: int
) -> np.ndarray:
    """``True`` where a row is eval: its bucket under ``eval_fraction``; with two or more distinct
    prompts, the prompt with the smallest bucket (``lowest``, over all rows) is eval if none
    would be, and the one with the largest (``highest``) is train if all would be eval."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    is_eval = b < eval_fraction
    if eval_fraction > 0 and distinct >= 2 and lowest is not None:
        if not lowest < eval_fraction:  # no row of the whole table is eval
            is_eval |= b == lowest
        if highest < eval_fraction:  # every row is eval
            is_eval &= b != highest
    return is_eval


def assign_split(prompt_ids: pd.Series, eval_fraction: float) -> np.ndarray:
    b = bucket(prompt_ids)
    lowest, highest = (float(b.min()), float(b.max())) if len(b) else (None, None)
    is_eval = split_rule(b, eval_fraction, lowest, highest, len(pd.unique(prompt_ids)))
    return np.where(is_eval, "eval", "train")


def build_alpaca(records: pd.DataFrame, eval_fraction: float = 0.1, is_eval: np.ndarray | None = None) -> pd.DataFrame:
    """The Alpaca table from deduplicated records (which carry ``record_id`` and ``prompt_id``)."""
    df = records.reset_index(drop=True)
    out = pd.DataFrame({c: df[c] for c in ALPACA_COLUMNS if c != "split"})
    key = df["near_group_id"] if "near_group_id" in df else df["prompt_id"]  # near duplicates share a split
    split = assign_split(key, eval_fraction) if is_eval is None else np.where(is_eval, "eval", "train")
    out.insert(5, "split", pd.Series(split, dtype="str"))
    return out


def empty_alpaca() -> pd.DataFrame:
    from pipeline.core.records import empty_records

    base = empty_records()
    return pd.DataFrame({c: base[c] if c in base else pd.Series([], dtype="str") for c in ALPACA_COLUMNS})


def write_alpaca(
    rows, path: str | os.PathLike, eval_fraction: float = 0.1, chunk_rows: int = CHUNK_ROWS, log=None
) -> dict:
    """The Alpaca Parquet from a deduplicated stage (:class:`~pipeline.core.records.StagedRows`),
    chunk by chunk: byte-identical to ``write_parquet(build_alpaca(all rows))``. Returns the counts.
    ``log``: a progress line every few seconds."""
    from pipeline.core.progress import Progress

    progress = Progress(log, "alpaca_dataset", rows.n_kept, every=5.0)
    buckets = rows.stats.get("prompt_buckets") or {}
    rule = (eval_fraction, buckets.get("min"), buckets.get("max"), int(buckets.get("distinct_prompts", 0)))
    counts = {"train": 0, "eval": 0, "rows_moved_to_their_group_split": 0}
    with ChunkWriter(path, "parquet", empty=empty_alpaca()) as out:
        for chunk in rows.iter_kept(chunk_rows):
            is_eval = split_rule(bucket(chunk["near_group_id"]), *rule)
            out.write(build_alpaca(chunk, eval_fraction, is_eval))
            n_eval = int(is_eval.sum())
            counts["eval"] += n_eval
            counts["train"] += len(chunk) - n_eval
            grouped = (chunk["near_group_id"] != chunk["prompt_id"]).to_numpy()
            if grouped.any():  # where a prompt's own bucket would have put it on the other side
                own = split_rule(bucket(chunk["prompt_id"][grouped]), *rule)
                counts["rows_moved_to_their_group_split"] += int((own != is_eval[grouped]).sum())
            progress(counts["train"] + counts["eval"])
    counts["rows"] = counts["train"] + counts["eval"]
    counts["near_duplicate_groups_kept_together"] = int(rows.stats.get("near_duplicate_groups", 0))
    return counts


def write_parquet(table: pa.Table | pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write deterministically and atomically (temporary file, then rename)."""
    if isinstance(table, pd.DataFrame):
        table = to_arrow(table)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, **PARQUET_SETTINGS)
    return path


def near_twins_across_splits(
    path: str | os.PathLike, threshold: float, chunk_rows: int = CHUNK_ROWS, shown: int = 5
) -> dict:
    """Held-out prompts with a near twin in train, found afresh from ``path`` (the same MinHash LSH
    as ``deduplicated_records``, over every row of the file, streamed): ``{"groups": groups with rows in
    both splits, "rows", "held_out_rows": their eval rows, "examples": [(eval file:line, train file:line)]}``."""
    from pipeline.stages.deduplicated_records.keys import prompt_keys
    from pipeline.stages.deduplicated_records.minhash import band_keys, lsh_bands, signatures
    from pipeline.stages.deduplicated_records.near import Sketches, near_groups, sketch

    path = Path(path)
    bands, evals = [], []
    with Sketches(path.parent / f".{path.name}.{os.getpid()}.sketches") as sketches:
        for chunk in iter_chunks(path, chunk_rows, columns=["instruction", "input", "output", "split"]):
            sig, has = signatures(prompt_keys(chunk)[2])
            bands.append(band_keys(sig, has, *lsh_bands(threshold)))
            sketches.add(sketch(sig))
            evals.append((chunk["split"] == "eval").to_numpy())
        if not bands:
            return {"groups": 0, "rows": 0, "held_out_rows": 0, "examples": []}
        is_eval = np.concatenate(evals)
        rows, heads = near_groups(np.concatenate(bands), sketches, threshold)
    del bands
    mixed = np.unique(heads[is_eval[rows]])
    mixed = np.intersect1d(mixed, np.unique(heads[~is_eval[rows]]))
    crossing = np.isin(heads, mixed)
    rows, heads = rows[crossing], heads[crossing]
    pairs = []
    for h in mixed[:shown].tolist():
        members = rows[heads == h]
        pairs.append((int(members[is_eval[members]][0]), int(members[~is_eval[members]][0])))
    where = _sources(path, {r for p in pairs for r in p}, chunk_rows)
    return {
        "groups": len(mixed),
        "rows": len(rows),
        "held_out_rows": int(is_eval[rows].sum()),
        "examples": [(where[a], where[b]) for a, b in pairs],
    }


def _sources(path, wanted: set[int], chunk_rows: int) -> dict[int, str]:
    out, offset = {}, 0
    for chunk in iter_chunks(path, chunk_rows, columns=["source_file", "source_line"]):
        for r in [r for r in wanted if offset <= r < offset + len(chunk)]:
            out[r] = f"{chunk.at[r - offset, 'source_file']}:{chunk.at[r - offset, 'source_line']}"
        offset += len(chunk)
    return out
