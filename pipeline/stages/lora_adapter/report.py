"""Progress and metrics of a training: to Dagster Pipes (when the child runs under it) or stdout,
and to ``metrics.jsonl`` beside the checkpoints (rank 0), which the asset sends on to MLflow as the
lines come (``pipeline.core.tracking_sync.MetricsTail``); and the readers the asset uses afterwards
(``read_metrics``, ``plot_loss_curve``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Reporter:
    """Progress to Dagster Pipes (if this process runs under it) or stdout; metrics to ``metrics.jsonl``."""

    def __init__(self, spec, is_main: bool):
        self.is_main = is_main
        self.pipes = None
        self.metrics_path = Path(spec.checkpoint_dir) / "metrics.jsonl"
        if not is_main:
            return
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            with open(self.metrics_path, "rb+") as fh:  # a kill mid-line left it unterminated: end it
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self._pipes_cm = open_dagster_pipes()
            self.pipes = self._pipes_cm.__enter__()

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.pipes is not None:
            self.pipes.log.info(msg)
        else:
            print(msg, flush=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        Path(self.metrics_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def done(self, metadata: dict[str, Any]) -> None:
        if self.pipes is not None:
            self.pipes.report_asset_materialization(metadata=metadata)
            self._pipes_cm.__exit__(None, None, None)
        elif self.is_main:
            print("RESULT " + json.dumps(metadata), flush=True)


class MissingReport(Exception):
    """The training child ended without its report: no figures through Pipes and none on disk."""


def child_report(reported: list[dict], out_dir: str | os.PathLike, warn) -> dict:
    """The figures the child reported through Dagster Pipes (``reported``: the metadata of each
    materialization that arrived); those in its training record on disk (written with the adapter,
    in the same rename) if none did; else :class:`MissingReport`: a green step without the
    training's figures would hide a lost report."""
    result = {k: getattr(v, "value", v) for k, v in (reported[-1] or {}).items()} if reported else {}
    if "steps" in result:
        return result
    from pipeline.stages.lora_adapter.spec import TRAINING_RECORD

    record = Path(out_dir) / TRAINING_RECORD
    on_disk = json.loads(record.read_text()).get("result", {}) if record.is_file() else {}
    if "steps" in on_disk:
        warn(f"the training's report did not arrive through Dagster Pipes: its figures are read from {record}")
        return on_disk
    raise MissingReport(
        f"the training child exited without its report: no materialization reached Dagster Pipes and {record} "
        "holds no result; nothing of this training is used"
    )


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut short by a kill mid-write: the resumed run logs that step again
            continue
    return out


def plot_loss_curve(metrics: list[dict]) -> bytes:
    """PNG of train and eval loss against the optimizer step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class Throughput:
    """Tokens and rows per second of the training steps themselves: counted from the end of the
    first step (which carries compilation and allocator warm-up), without the time spent on
    evaluation and checkpoints. ``sync`` waits for the device, so GPU timings are real."""

    def __init__(self, sync=lambda: None):
        self.sync = sync
        self.start: float | None = None
        self.excluded = 0.0
        self.tokens = self.rows = self.steps = 0

    def step_done(self, tokens: int, rows: int) -> None:
        if self.start is None:
            self.sync()
            self.start = time.perf_counter()
            return
        self.tokens, self.rows, self.steps = self.tokens + tokens, self.rows + rows, self.steps + 1

    def excluding(self):
        """Context manager: time inside it does not count (evaluation, checkpoints)."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            t = time.perf_counter()
            try:
                yield
            finally:
                self.excluded += time.perf_counter() - t

        return cm()

    def summary(self) -> dict[str, float | None]:
        if self.start is None or not self.steps:
            return {"steady_steps": 0, "steady_seconds": None, "steady_tokens_per_s": None, "steady_rows_per_s": None}
        self.sync()
        seconds = time.perf_counter() - self.start - self.excluded
        return {
            "steady_steps": self.steps,
            "steady_seconds": round(seconds, 2),
            "steady_tokens_per_s": round(self.tokens / seconds, 2),
            "steady_rows_per_s": round(self.rows / seconds, 4),
        }
