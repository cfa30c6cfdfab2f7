"""MLflow logging from the asset's process (pipeline/core/tracking_sync.py): the training's
``metrics.jsonl`` lines reach MLflow while it runs, once each, and an outage ends the tailing with
one warning while the lines stay on disk."""

import json
import time

from mlflow.tracking import MlflowClient

from conftest import mlflow_store
from pipeline.core.tracking_sync import MetricsTail, send_missing_metrics


def append(path, step, **values):
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_lines_appended_while_training_reach_mlflow_live_and_once(tmp_path):
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    metrics = tmp_path / "ckpt" / "metrics.jsonl"
    metrics.parent.mkdir()
    append(metrics, 1, train_loss=3.0)  # an earlier, interrupted attempt's line: sent afterwards, not live
    warnings = []
    with MetricsTail(lambda: MlflowClient(uri), run_id, metrics, warnings.append, every=0.05) as tail:
        append(metrics, 2, train_loss=2.5, learning_rate=1e-3)
        wait_for(
            lambda: [m.step for m in client.get_metric_history(run_id, "train_loss")] == [2]
        )  # while the training runs
        with open(metrics, "a") as fh:
            fh.write('{"step": 3, "time": 1, "train_lo')  # a line being written: read once complete
        time.sleep(0.2)
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [2]
        with open(metrics, "a") as fh:
            fh.write('ss": 2.0}\n')
        wait_for(lambda: len(client.get_metric_history(run_id, "train_loss")) == 2)
    assert tail.sent == 3 and warnings == []
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert send_missing_metrics(client, run_id, lines) == 1  # only the earlier attempt's step 1
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(run_id, "learning_rate")] == [1e-3]


def test_an_unreachable_server_warns_once_and_stops_tailing(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    calls, warnings = [], []

    class Down:
        def log_batch(self, run_id, metrics):
            calls.append(len(metrics))
            raise ConnectionError("connection refused")

    with MetricsTail(Down, "run", metrics, warnings.append, every=0.05):
        append(metrics, 1, train_loss=3.0)
        wait_for(lambda: warnings)
        append(metrics, 2, train_loss=2.0)
        time.sleep(0.3)
    assert calls == [1] and len(warnings) == 1
    assert (
        "MLflow logging failed at step 1 (connection refused); training goes on" in warnings[0]
        and str(metrics) in warnings[0]
    )
