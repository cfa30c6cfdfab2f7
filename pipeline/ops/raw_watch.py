"""The logic of ``raw_data_sensor``: a content fingerprint of the raw folder and the debounce rule.

The fingerprint covers the files ``raw_records`` reads (paths relative to the raw folder and
sha256 of their contents), so touching a file, or rewriting it with the same bytes, changes
nothing. A change is acted on only once the folder has been quiet (the same fingerprint) for
``quiet_seconds``: a burst of writes leads to one run. Plain functions, tested without Dagster.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from pipeline.stages.raw_records import EMPTY, raw_fingerprint

__all__ = ["EMPTY", "Decision", "WatchState", "decide", "raw_fingerprint"]


@dataclass
class WatchState:
    seen: str | None = None  # the fingerprint a run was requested for (or the baseline)
    pending: str | None = None  # a new fingerprint waiting for the folder to be quiet
    pending_since: float | None = None

    def dump(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def load(cls, cursor: str | None) -> WatchState:
        if not cursor:
            return cls()
        try:
            return cls(**json.loads(cursor))
        except (ValueError, TypeError):
            return cls()


@dataclass
class Decision:
    action: str  # "run", "wait", "none", "baseline"
    fingerprint: str
    state: WatchState
    message: str


def decide(state: WatchState, fingerprint: str, now: float, quiet_seconds: float, built: str | None = None) -> Decision:
    """What the sensor does on a tick.

    ``built`` is the fingerprint recorded by the latest ``raw_records`` materialization; it seeds
    a sensor that has no state yet, so a freshly started sensor does not retrain on data that was
    already built, but does when the folder changed since.
    """
    if fingerprint == "unreadable":
        return Decision("wait", fingerprint, state, "a raw file could not be read (being written?): looking again")
    if state.seen is None:
        if built is None or built == fingerprint:
            new = WatchState(seen=fingerprint)
            why = "matches the last build" if built else "nothing built yet; materialize once, or drop a new file"
            return Decision("baseline", fingerprint, new, f"baseline {fingerprint[:12]} recorded ({why})")
        state = WatchState(seen=built)
    if fingerprint == state.seen:
        return Decision("none", fingerprint, WatchState(seen=state.seen), f"raw data unchanged ({fingerprint[:12]})")
    if fingerprint != state.pending or state.pending_since is None:
        new = WatchState(seen=state.seen, pending=fingerprint, pending_since=now)
        return Decision(
            "wait",
            fingerprint,
            new,
            f"raw data changed ({fingerprint[:12]}); waiting {quiet_seconds:g} s for the folder to be quiet",
        )
    if now - state.pending_since < quiet_seconds:
        return Decision(
            "wait",
            fingerprint,
            state,
            f"raw data changed ({fingerprint[:12]}); quiet for {now - state.pending_since:.0f} of {quiet_seconds:g} s",
        )
    return Decision(
        "run",
        fingerprint,
        WatchState(seen=fingerprint),
        f"raw data changed to {fingerprint[:12]} and settled: retraining",
    )
