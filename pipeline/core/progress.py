"""Progress lines for long work: how far, how fast, how long left, at most every few seconds, so a
user watching Dagster's run view sees a stage move (the data stages, the evaluation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Progress:
    """``progress(done)`` logs ``what: done/total unit, rate, seconds, ETA`` when ``every`` seconds
    have passed since the last line (and always once ``done`` reaches ``total``). ``total`` None: a
    count without an end known in advance. ``log`` None: silent."""

    log: Callable[[str], object] | None
    what: str
    total: int | None = None
    unit: str = "rows"
    every: float = 10.0
    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0

    def __call__(self, done: int, extra: str = "") -> None:
        if self.log is None:
            return
        now = time.perf_counter()
        finished = self.total is not None and done >= self.total
        if not finished and now - self.last < self.every:
            return
        self.last = now
        spent = now - self.start
        rate = done / spent if spent > 0 else 0.0
        count = f"{done:,}/{self.total:,}" if self.total is not None else f"{done:,}"
        left = ""
        if self.total is not None and not finished and rate > 0:
            left = f", about {(self.total - done) / rate:.0f} s left"
        speed = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
        self.log(
            f"{self.what}: {count} {self.unit}, {speed} {self.unit}/s, {spent:.0f} s{left}"
            + (f"; {extra}" if extra else "")
        )
