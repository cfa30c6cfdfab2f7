"""MLflow logging that survives the tracking server going away.

Training and evaluation keep everything they log on local disk first (``metrics.jsonl``, the
adapter folder, the evaluation folder). Sending it to MLflow is a separate, repeatable step: if it
fails, a ``mlflow_pending.json`` marker is written next to the local results, the asset says so in
its log and metadata, and the next materialization sends what is missing (metrics by key and
step, so nothing is logged twice) before it reports success.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_bytes_atomic
from pipeline.core.secrets import redact

PENDING = "mlflow_pending.json"
# on a copy of a training's MLflow run made in another store: the run it was copied from
COPIED_FROM_TAG = "medtune.copied_from_run"
COMPLETE = "complete"

# A server that is down should cost seconds, not MLflow's default of 7 retries with backoff.
QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    """Short MLflow HTTP retries for the duration (unless the user set their own)."""
    saved = {k: os.environ.get(k) for k in QUICK_HTTP}
    for k, v in QUICK_HTTP.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def pending(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / PENDING
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {"error": "unreadable marker"}


def attempt(folder: str | os.PathLike, what: str, tracking_uri: str, run_id: str, send: Callable[[], None]) -> str:
    """Run ``send`` (the MLflow calls); return :data:`COMPLETE`, or a message saying what failed and
    where the results are kept, after writing the pending marker so the next run retries."""
    folder = Path(folder)
    try:
        with quick_http():
            send()
    except Exception as exc:  # any tracking failure: the local results stay the truth
        earlier = pending(folder) or {}
        marker = {
            "what": what,
            "tracking_uri": redact(tracking_uri),
            "run_id": run_id,
            "error": redact(f"{type(exc).__name__}: {exc}")[:2000],
            "since": earlier.get("since") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_bytes_atomic(folder / PENDING, json.dumps(marker, indent=2).encode())
        return (
            f"FAILED: could not log the {what} to MLflow at {redact(tracking_uri)} ({marker['error'][:300]}). "
            f"The results are kept in {folder}; the next materialization sends them to run {run_id}."
        )
    with contextlib.suppress(FileNotFoundError):
        (folder / PENDING).unlink()
    return COMPLETE


def last_values(metrics: list[dict]) -> dict[tuple[str, int], tuple[float, int]]:
    """(key, step) -> (value, time in ms), the last record winning (a resumed training repeats steps)."""
    out: dict[tuple[str, int], tuple[float, int]] = {}
    for m in metrics:
        step, t = int(m.get("step", 0)), int(float(m.get("time", 0)) * 1000)
        for k, v in m.items():
            if k in ("step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if v != v or abs(v) == float("inf"):
                continue
            out[(k, step)] = (float(v), t)
    return out


def send_missing_metrics(client: Any, run_id: str, metrics: list[dict]) -> int:
    """Log the (key, step) points MLflow does not hold yet; returns how many were sent."""
    from mlflow.entities import Metric

    wanted = last_values(metrics)
    have: set[tuple[str, int]] = set()
    for key in {k for k, _ in wanted}:
        have |= {(key, m.step) for m in client.get_metric_history(run_id, key)}
    missing = [Metric(k, v, t, s) for (k, s), (v, t) in sorted(wanted.items()) if (k, s) not in have]
    for i in range(0, len(missing), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=missing[i : i + 900])
    return len(missing)


class MetricsTail:
    """Send the lines a training appends to its ``metrics.jsonl`` to MLflow while it runs, from the
    process that launched it (the child imports no MLflow: about 2 s less at each start).

    Only lines written after :meth:`start` (what this attempt trains; an earlier attempt's lines go
    with :func:`send_training` afterwards). The first failure is reported through ``warn`` and ends the
    tailing: the training goes on, and :func:`send_training` sends whatever is missing."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        run_id: str,
        path: Path,
        warn: Callable[[str], None],
        every: float = 1.0,
    ):
        self.client_factory, self.run_id, self.path, self.warn, self.every = (
            client_factory,
            run_id,
            Path(path),
            warn,
            every,
        )
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="medtune-metrics-tail", daemon=True)
        self.sent = 0

    def __enter__(self) -> MetricsTail:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()

    def _new_lines(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        out = []
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def _run(self) -> None:
        from mlflow.entities import Metric

        client = None
        while not self.stopped.wait(self.every):
            lines = self._new_lines()
            if not lines:
                continue
            batch = [Metric(k, v, t, s) for (k, s), (v, t) in sorted(last_values(lines).items())]
            try:
                with quick_http():
                    client = client or self.client_factory()
                    for i in range(0, len(batch), 900):
                        client.log_batch(self.run_id, metrics=batch[i : i + 900])
                self.sent += len(batch)
            except Exception as exc:  # keep training; the metrics are in metrics.jsonl
                self.warn(
                    f"MLflow logging failed at step {lines[-1].get('step')} ({redact(exc)[:300]}); training goes on, "
                    f"metrics are kept in {self.path} and sent to MLflow when it is reachable again"
                )
                return


def send_training(client, run_id: str, out_dir: Path, metrics: list[dict], log) -> None:
    """Everything a training's MLflow run should hold (``metrics``: its ``metrics.jsonl``, the adapter
    folder, the loss curve), sent again where missing: idempotent."""
    sent = send_missing_metrics(client, run_id, metrics)
    if sent:
        log(f"sent {sent} metric points MLflow did not have yet (kept in {out_dir / 'metrics.jsonl'})")
    client.log_artifact(run_id, str(out_dir / "loss_curve.png"), "plots")
    client.log_artifacts(run_id, str(out_dir), "adapter")
    client.set_tag(run_id, "medtune.tracking", "complete")
    client.set_terminated(run_id, "FINISHED")


def unfinished(client, run_id: str) -> str | None:
    """The run's status when it is not FINISHED (a process killed or interrupted after the adapter
    was written and before the run was ended leaves it RUNNING); None when finished or unknown."""
    try:
        with quick_http():
            status = client.get_run(run_id).info.status
    except Exception:  # unreachable: the sending that follows says what failed
        return None
    return None if status == "FINISHED" else status


def known_run(client, run_id: str, adapter_id: str, warn) -> str | None:
    """The MLflow run of a cached adapter in this store: ``run_id`` when the store has it, else a complete
    copy made earlier (tagged with the adapter id and the run it copies), else None. When the store
    cannot be asked, ``run_id`` (the sending that follows says what failed)."""
    from mlflow.exceptions import MlflowException

    try:
        with quick_http():
            client.get_run(run_id)
            return run_id
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(exc, "error_code", "")) and "not found" not in str(exc):
            warn(f"could not look MLflow run {run_id} up ({redact(exc)[:300]})")
            return run_id
    except Exception as exc:
        warn(f"could not look MLflow run {run_id} up ({redact(exc)[:300]})")
        return run_id
    copies = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`medtune.adapter_id` = '{adapter_id}' and tags.`{COPIED_FROM_TAG}` = '{run_id}' "
        "and tags.`medtune.tracking` = 'complete'",
        max_results=1,
    )
    return copies[0].info.run_id if copies else None
