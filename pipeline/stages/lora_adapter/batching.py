"""Rows in, steps out: which rows each optimizer step trains on, laid end to end without padding.

Every step's rows are one flat sequence (batch dimension 1): the token ids of row after row, with
position ids that restart at 0 for each row and the rows' lengths, which the packed attention
uses to keep every row to itself. Nothing is padded, so no compute goes to padding whatever the
rows' lengths.

* packing on: rows in a seeded, per-epoch shuffled order fill a step until the next row would pass
  ``pack_tokens`` (a row longer than that goes alone);
* packing off: ``per_device_batch_size`` rows a step, in the same shuffled order.

The loss targets are gathered here too, on the host, so that the step reads nothing back from
the device: for each row, the positions whose next token is supervised and those next tokens
(never across a row boundary).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages.tokenized_dataset import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

Row = tuple[list[int], list[int]]  # (input_ids, labels)


def load_rows(tokenized_path: str, split: str, max_seq_len: int) -> list[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(Path(tokenized_path) / f"{split}.parquet", columns=["input_ids", "labels"])
    ids, labels = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    return [(i[:max_seq_len], l[:max_seq_len]) for i, l in zip(ids, labels)]


def with_openings(rows: list[Row], opening_tokens: int, repeats: int) -> list[Row]:
    """The rows, then ``repeats`` copies of each row cut after its prompt and the first
    ``opening_tokens`` tokens of its answer (rows with nothing to cut are not copied)."""
    if not repeats or not opening_tokens:
        return rows
    cut: list[Row] = []
    for ids, labels in rows:
        first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        end = first + opening_tokens
        if end < len(ids):
            cut.append((ids[:end], labels[:end]))
    return rows + [r for _ in range(repeats) for r in cut]


def plan_epoch(
    lengths: list[int], seed: int, epoch: int, *, packing: bool, pack_tokens: int, batch_size: int
) -> list[list[int]]:
    """The row indices of each micro-batch of one epoch, in training order (fixed by seed and epoch)."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if not packing:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > pack_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    """One micro-batch as the model takes it: rows end to end, and the loss targets."""

    input_ids: torch.Tensor  # [1, tokens]
    position_ids: torch.Tensor  # [1, tokens], restarting at 0 for each row
    row_lengths: tuple[int, ...]
    positions: torch.Tensor  # [supervised]: index of the token whose next token is a target
    targets: torch.Tensor  # [supervised]
    tokens: int
    supervised: int

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.position_ids),
            self.row_lengths,
            move(self.positions),
            move(self.targets),
            self.tokens,
            self.supervised,
        )


def flatten(rows: list[Row]) -> Batch:
    """Lay ``rows`` end to end. Targets: for each row, ``labels[t + 1]`` at every position ``t`` where
    it is supervised."""
    import torch

    ids: list[int] = []
    pos: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    for row_ids, labels in rows:
        offset = len(ids)
        ids += row_ids
        pos += range(len(row_ids))
        for t in range(len(labels) - 1):
            if labels[t + 1] != IGNORE_INDEX:
                positions.append(offset + t)
                targets.append(labels[t + 1])
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        row_lengths=tuple(len(r[0]) for r in rows),
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        tokens=len(ids),
        supervised=len(targets),
    )


def collate_padded(rows: list[Row], pad_id: int, multiple: int = 8) -> dict:
    """A right-padded batch for the model's own forward (evaluation): padded to the longest row,
    rounded up to a multiple of 8; padding is never supervised."""
    import torch

    longest = max(len(r[0]) for r in rows)
    width = -(-longest // multiple) * multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for k, (ids, lab) in enumerate(rows):
        input_ids[k, : len(ids)] = torch.tensor(ids)
        labels[k, : len(lab)] = torch.tensor(lab)
        attention[k, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
