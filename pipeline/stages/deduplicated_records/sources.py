"""Where each row of ``deduplicated_records`` came from (``file:line``), held as compact arrays
so that reasons can name the row a duplicate repeats, for any number of rows."""

from __future__ import annotations

import numpy as np
import pandas as pd


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
