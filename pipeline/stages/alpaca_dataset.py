"""Stage 4 (asset ``alpaca_dataset``): the train/eval split and the Alpaca-format Parquet file.

The split is a function of the normalised prompt alone (``prompt_id``): a prompt's bucket is
the first 64 bits of its hash as a fraction of 2**64; below ``eval_fraction`` it is eval.
So adding rows never moves an existing prompt, and rows sharing a prompt share a split. With
two or more distinct prompts and ``eval_fraction`` > 0, at least one prompt is eval (the one
with the smallest bucket) and at least one is train (the largest).

The file is written with fixed settings (zstd, fixed row-group size, no index), so the same
rows give a byte-identical file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_path

ALPACA_COLUMNS = ("record_id", "prompt_id", "instruction", "input", "output", "split", "source_file", "source_line")
ROW_GROUP_SIZE = 100_000


def bucket(prompt_ids: pd.Series) -> np.ndarray:
    """Each prompt's position in [0, 1) from its hash."""
    ids = prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else list(prompt_ids)
    return np.array([int(p[:16], 16) for p in ids], dtype=np.float64) / 2.0**64


def assign_split(prompt_ids: pd.Series, eval_fraction: float) -> np.ndarray:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    b = bucket(prompt_ids)
    is_eval = b < eval_fraction
    distinct = pd.unique(prompt_ids)
    if eval_fraction > 0 and len(distinct) >= 2:
        if not is_eval.any():
            is_eval |= b == b.min()
        if is_eval.all():
            is_eval &= b != b.max()
    return np.where(is_eval, "eval", "train")


def build_alpaca(records: pd.DataFrame, eval_fraction: float = 0.1) -> pd.DataFrame:
    """The Alpaca table from deduplicated records (which carry ``record_id`` and ``prompt_id``)."""
    df = records.reset_index(drop=True)
    out = pd.DataFrame({c: df[c] for c in ALPACA_COLUMNS if c != "split"})
    out.insert(5, "split", pd.Series(assign_split(df["prompt_id"], eval_fraction), dtype="str"))
    return out


def to_arrow(df: pd.DataFrame) -> pa.Table:
    """Arrow table with plain ``string`` columns (readable everywhere); ``large_string`` is
    kept only where a column is too large for 32-bit offsets."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = []
    for f in table.schema:
        fields.append(pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f)
    try:
        return table.cast(pa.schema(fields, metadata=table.schema.metadata))
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        return table


def write_parquet(table: pa.Table | pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write deterministically and atomically (temporary file, then rename)."""
    if isinstance(table, pd.DataFrame):
        table = to_arrow(table)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=ROW_GROUP_SIZE,
            write_statistics=True,
            store_schema=True,
        )
    return path
