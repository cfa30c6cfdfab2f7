"""Faults: the tracking server going away mid-training, the training child SIGKILLed at a random
point, a kill while outputs are written, a full disk and a read-only folder, two materializations
at once. Each ends with nothing lost and nothing half-written."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, Definitions
from mlflow.tracking import MlflowClient

from conftest import demo_records, materialize_command, mlflow_store, model_in_data_root, write_json
from pipeline.core.tracking_sync import PENDING
from pipeline.definitions import JOBS, all_asset_checks, all_assets, make_resources

pytestmark = pytest.mark.slow  # pipelines in subprocesses, killed and resumed: make test, not make test-fast

PROJECT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("MEDTUNE_FAULT_SEED", time.time_ns() % 100_000))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pipeline(data_dir, tracking_uri, model_dir, job="full_pipeline_job", **train_config):
    defs = Definitions(
        assets=all_assets,
        asset_checks=all_asset_checks,
        jobs=JOBS,
        resources=make_resources(str(data_dir), tracking_uri),
    )
    config = {
        "ops": {
            "base_model": {"config": {"model": model_in_data_root(model_dir, data_dir)}},
            "tokenized_dataset": {"config": {"max_seq_len": 256}},
            "lora_adapter": {
                "config": {
                    "max_steps": 6,
                    "save_every": 2,
                    "eval_every": 3,
                    "learning_rate": 5e-3,
                    "precision": "fp32",
                    "log_every": 1,
                    "r": 16,
                    "lora_alpha": 32,
                    "compile": False,  # torch.compile costs ~4 s a training child; covered in test_lora_adapter_asset
                    **train_config,
                }
            },
            "evaluation_report": {"config": {"max_new_tokens": 8, "train_sample_size": 4}},
        }
    }
    job_def = defs.resolve_job_def(job)
    config["ops"] = {k: v for k, v in config["ops"].items() if job_def.graph.has_node_named(k)}
    return job_def.execute_in_process(run_config=config, instance=DagsterInstance.ephemeral(), raise_on_error=False)


def meta(result, node, key):
    return result.asset_materializations_for_node(node)[0].metadata[key].value


def step_error(result, node) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure and e.step_key == node)
    return str(failure.event_specific_data.error)


@pytest.fixture
def data_dir(tmp_path):
    write_json(tmp_path / "data" / "raw" / "demo.json", demo_records(24))
    return tmp_path / "data"


class MlflowServer:
    """A real ``mlflow server`` on loopback over a SQLite store that outlives it."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'store.db'}",
                "--artifacts-destination",
                (self.root / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start in 120 s")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_tracking_server_going_away_mid_training_loses_nothing(data_dir, tmp_path, tiny_model_dir):
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    try:
        box = {}
        worker = threading.Thread(
            target=lambda: box.setdefault(
                "result", run_pipeline(data_dir, server.uri, tiny_model_dir, max_steps=24, save_every=8, eval_every=8)
            )
        )
        worker.start()
        deadline = time.monotonic() + 300
        metrics = None
        while time.monotonic() < deadline and worker.is_alive():  # wait for step 3, then pull the plug
            found = list((data_dir / "models" / "checkpoints").glob("*/metrics.jsonl"))
            if found and sum(1 for line in found[0].read_text().splitlines() if '"train_loss"' in line) >= 3:
                metrics = found[0]
                break
            time.sleep(0.05)
        assert metrics is not None, "training never reached step 3"
        server.kill()
        worker.join(600)
        first = box["result"]

        # training completed and kept everything locally; every asset says what failed
        assert not first.success  # registration is impossible: the run says so instead of passing
        tracking = meta(first, "lora_adapter", "mlflow_tracking")
        assert tracking.startswith("FAILED: could not log the training run to MLflow at " + server.uri), tracking
        adapter = Path(meta(first, "lora_adapter", "path"))
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / PENDING).is_file()
        steps = {
            json.loads(x)["step"] for x in (adapter / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in x
        }
        assert steps == set(range(1, 25))
        assert meta(first, "evaluation_report", "mlflow_tracking").startswith("FAILED")
        assert meta(first, "merged_model", "cache_hit") is False
        error = step_error(first, "registered_model")
        assert "NOT registered: MLflow at " + server.uri in error and "unreachable" in error

        # the server comes back on the same store: the next run sends what was missed, then registers
        server.start()
        second = run_pipeline(data_dir, server.uri, tiny_model_dir, max_steps=24, save_every=8, eval_every=8)
        assert second.success
        assert meta(second, "lora_adapter", "cache_hit") is True
        assert meta(second, "lora_adapter", "mlflow_tracking") == "complete"
        assert meta(second, "evaluation_report", "mlflow_tracking") == "complete"
        assert not (adapter / PENDING).exists()
        client = MlflowClient(server.uri, registry_uri=server.uri)
        run_id = meta(second, "lora_adapter", "mlflow_run_id")
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(1, 25))  # every step once, none twice
        assert len(client.get_metric_history(run_id, "eval_loss")) >= 3
        assert "tuned_eval_loss" in run.data.metrics
        assert {"adapter/adapter_model.safetensors"} <= {a.path for a in client.list_artifacts(run_id, "adapter")}
        assert meta(second, "registered_model", "registered") is True
    finally:
        server.kill()


def _child_pid(marker: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in out if int(p) != os.getpid()]
    return pids[0] if pids else None


def logged_steps(data_dir: Path) -> int:
    return sum(
        p.read_text().count('"train_loss"') for p in (data_dir / "models" / "checkpoints").glob("*/metrics.jsonl")
    )


def test_training_killed_at_random_points_resumes_and_the_adapter_loads(data_dir, tiny_model_dir):
    """SIGKILL the training child twice at random points (seed printed; MEDTUNE_FAULT_SEED replays
    it): while it loads, or after a random number of its steps, so that a fast machine cannot finish
    the training before the kill."""
    rng = random.Random(SEED)
    uri = f"sqlite:///{data_dir.parent / 'mlflow.db'}"
    print(f"fault seed {SEED}")
    kills = 0
    for _attempt in range(2):
        box = {}
        worker = threading.Thread(
            target=lambda box=box: box.setdefault(
                "r", run_pipeline(data_dir, uri, tiny_model_dir, max_steps=30, save_every=3)
            )
        )
        worker.start()
        pid = None
        while worker.is_alive() and pid is None:
            pid = _child_pid(
                f"pipeline.stages.lora_adapter --spec {data_dir}"
            )  # this test's child, not another worker's
            time.sleep(0.02)
        assert pid is not None, "no training child started"
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0.0, 1.0))  # while it loads the model, or in its first steps
        else:
            before, steps = logged_steps(data_dir), rng.randint(1, 12)  # of 30: the child cannot finish first
            while logged_steps(data_dir) < before + steps and worker.is_alive():
                time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        kills += 1
        worker.join(600)
    final = run_pipeline(data_dir, uri, tiny_model_dir, max_steps=30, save_every=3)
    assert final.success, step_error(final, "lora_adapter")
    assert kills == 2
    adapter = Path(meta(final, "lora_adapter", "path"))
    assert meta(final, "lora_adapter", "steps") == 30 or meta(final, "lora_adapter", "cache_hit") is True
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(base, adapter)  # complete and loadable
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert not list(adapter.parent.glob(".tmp-*"))


WRITER = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    import pandas as pd
    import numpy as np
    from safetensors.numpy import save_file
    from pipeline.core.atomic import atomic_dir
    from pipeline.stages.alpaca_dataset import write_parquet
    out = Path(sys.argv[1])
    for k in range(1, 10_000):
        write_parquet(pd.DataFrame({"version": [k] * 200_000, "x": np.arange(200_000)}), out / "alpaca.parquet")
        with atomic_dir(out / "adapter") as tmp:   # how adapters, tokenized data and merged models are written
            save_file({"w": np.full((512, 512), k, dtype=np.float32)}, str(tmp / "adapter_model.safetensors"))
            (tmp / "record.json").write_text(json.dumps({"version": k}))
        print(k, flush=True)
""")


def test_a_kill_while_outputs_are_written_leaves_the_previous_complete_version(tmp_path):
    from safetensors.numpy import load_file

    rng = random.Random(SEED)
    out = tmp_path / "out"
    for _round in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(out)],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(PROJECT)},
        )
        proc.stdout.readline()  # one complete version exists
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        table = pd.read_parquet(out / "alpaca.parquet")  # readable, and one version throughout
        assert len(table) == 200_000 and table["version"].nunique() == 1
        weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))["w"]
        record = json.loads((out / "adapter" / "record.json").read_text())
        assert float(weights.min()) == float(weights.max()) == record["version"]  # both files of one version
    # the next write replaces it whole and cleans the dead writers' temporaries
    proc = subprocess.run(
        [sys.executable, "-c", WRITER.replace("range(1, 10_000)", "range(7, 8)"), str(out)],
        cwd=PROJECT,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        capture_output=True,
    )
    assert proc.returncode == 0
    assert pd.read_parquet(out / "alpaca.parquet")["version"].unique().tolist() == [7]
    assert [p.name for p in sorted(out.iterdir())] == ["adapter", "alpaca.parquet"]


def mount_tmpfs(path: Path, size_kb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:  # no mount rights here: the monkeypatched variants in test_atomic.py still run
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip()})")


def all_parquet_readable(folder: Path) -> int:
    files = list(folder.rglob("*.parquet"))
    for f in files:
        pd.read_parquet(f)
    return len(files)


def test_disk_full_and_read_only_output_folders_fail_clearly_without_partial_output(data_dir, tmp_path, tiny_model_dir):
    processed = data_dir / "processed"
    mount_tmpfs(processed, 600)
    try:
        uri = mlflow_store(tmp_path / "mlflow.db")
        ok = run_pipeline(data_dir, uri, tiny_model_dir, job="prepare_data_job")
        assert ok.success
        before = pd.read_parquet(processed / "alpaca.parquet")

        # more data than the folder holds: the disk fills up mid-write
        write_json(
            data_dir / "raw" / "big.json",
            [
                {"instruction": f"问题{i}：" + "头痛发热" * 20, "input": "", "output": f"答案{i}：" + "板蓝根颗粒" * 40}
                for i in range(20_000)
            ],
        )
        full = run_pipeline(data_dir, uri, tiny_model_dir, job="prepare_data_job")
        assert not full.success
        failure = next(e for e in full.all_events if e.is_step_failure)
        message = str(failure.event_specific_data.error)
        assert "No space left on device" in message and str(processed) in message, message
        assert not list(processed.rglob(".tmp-*")), list(processed.rglob(".tmp-*"))  # nothing half-written
        assert all_parquet_readable(processed) >= 2
        assert pd.read_parquet(processed / "alpaca.parquet").equals(before)  # the last complete version

        # a read-only output folder
        (data_dir / "raw" / "big.json").unlink()
        write_json(data_dir / "raw" / "more.json", demo_records(30)[24:])
        subprocess.run(["mount", "-o", "remount,ro", str(processed)], check=True)
        ro = run_pipeline(data_dir, uri, tiny_model_dir, job="prepare_data_job")
        assert not ro.success
        failure = next(e for e in ro.all_events if e.is_step_failure)
        message = str(failure.event_specific_data.error)
        assert "not writable" in message or "Read-only file system" in message, message
        assert str(processed) in message, message
        assert pd.read_parquet(processed / "alpaca.parquet").equals(before)
    finally:
        subprocess.run(["umount", "-l", str(processed)], capture_output=True)


def test_a_run_killed_outright_frees_its_training_slot_and_the_next_run_resumes(data_dir, tmp_path, tiny_model_dir):
    """SIGKILL the whole `dagster asset materialize` process group mid-training (no chance to clean
    up): its pool slot stays claimed until pipeline.ops.recover (make run, make ui and the sensor call
    it) sees the process is gone; then the next run resumes from the checkpoint."""
    from dagster import DagsterInstance, DagsterRunStatus

    cmd, env, home = materialize_command(data_dir, tmp_path, tiny_model_dir, max_steps=40, save_every=4, eval_every=20)
    proc = subprocess.Popen(
        cmd, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not list((data_dir / "models" / "checkpoints").glob("*/step-8/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "training never reached its second checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its training child, mid-training
    proc.wait()

    instance = DagsterInstance.from_config(str(home))
    (run,) = instance.get_runs()
    assert run.status == DagsterRunStatus.STARTED  # nobody recorded its end
    claims = instance.event_log_storage.get_concurrency_info("medtune_training").claimed_slots
    assert [c.run_id for c in claims] == [run.run_id]  # the slot every later training would wait for
    instance.dispose()

    recovered = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.recover"], cwd=PROJECT, env=env, capture_output=True, text=True
    )
    assert recovered.returncode == 0 and f"recovered run {run.run_id}" in recovered.stdout, (
        recovered.stdout + recovered.stderr
    )
    instance = DagsterInstance.from_config(str(home))
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    assert instance.event_log_storage.get_concurrency_info("medtune_training").claimed_slots == []
    instance.dispose()

    again = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "was interrupted: resuming from its latest checkpoint" in again.stdout + again.stderr
    adapters = list((data_dir / "models" / "adapters").iterdir())
    assert len(adapters) == 1 and (adapters[0] / "adapter_model.safetensors").is_file()
    record = json.loads((adapters[0] / "medtune_training.json").read_text())
    assert record["result"]["steps"] == 40 and record["result"]["resumed_from"] in (
        "step-8",
        "step-12",
        "step-16",
        "step-20",
        "step-24",
        "step-28",
        "step-32",
        "step-36",
    )


def test_a_full_disk_during_training_fails_with_the_path_and_keeps_no_partial_checkpoint(
    data_dir, tmp_path, tiny_model_dir
):
    checkpoints = data_dir / "models" / "checkpoints"
    mount_tmpfs(checkpoints, 48)  # room for the spec and the metrics, not for a checkpoint
    try:
        result = run_pipeline(
            data_dir,
            mlflow_store(tmp_path / "mlflow.db"),
            tiny_model_dir,
            job="full_pipeline_job",
            max_steps=8,
            save_every=2,
        )
        assert not result.success
        message = step_error(result, "lora_adapter")
        assert "training failed: OutputWriteError: could not write" in message and str(checkpoints) in message, message
        assert "No space left on device" in message
        assert not list(checkpoints.rglob(".tmp-*")) and not list(checkpoints.glob("*/step-*"))
        runs = MlflowClient(mlflow_store(tmp_path / "mlflow.db")).search_runs(["1"])
        assert runs[0].info.status == "FAILED" and "No space left" in runs[0].data.tags["medtune.error"]
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], capture_output=True)


MERGER = textwrap.dedent("""
    import sys
    from pipeline.stages.merged_model import merge_adapter
    base, adapter, dest = sys.argv[1:4]
    for k in range(1, 10_000):
        merge_adapter(base, adapter, dest, record={"merged_id": f"v{k}"})
        print(k, flush=True)
""")


def test_a_kill_while_the_merged_model_is_written_leaves_a_loadable_model(tmp_path, tiny_model_dir):
    """The real exporter (merge_adapter), killed at random moments while it rewrites its folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages.merged_model import read_export_record

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    n_params = sum(p.numel() for p in base.parameters())
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    dest = tmp_path / "merged"
    rng = random.Random(SEED + 1)
    for _round in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", MERGER, str(tiny_model_dir), str(adapter), str(dest)],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(PROJECT)},
        )
        proc.stdout.readline()  # one complete export exists
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.wait()
        assert read_export_record(dest)["merged_id"].startswith("v")  # the record of a complete export
        model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32, use_safetensors=True)
        assert sum(p.numel() for p in model.parameters()) == n_params  # complete: every weight there


KILL_POINTS = ("before_upload", "during_upload", "before_end")


def die_at(point: str):
    """``send_training`` that SIGKILLs its own process at ``point``: before the upload, halfway
    through the metrics, or after everything but the run's end."""
    import assets.lora_adapter as asset_module
    from pipeline.core.tracking_sync import send_missing_metrics

    real = asset_module.send_training

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class NoEnd:
        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            return getattr(self.client, name)

        def set_terminated(self, *args, **kwargs):
            die()

    def send(client, run_id, out_dir, metrics, log):
        if point == "during_upload":
            send_missing_metrics(client, run_id, metrics[: len(metrics) // 2])
        if point in ("before_upload", "during_upload"):
            die()
        real(NoEnd(client), run_id, out_dir, metrics, log)

    return send


# one pipeline run in a process of its own, SIGKILLed by die_at at the point in argv[1]
KILLED_RUN = """
import sys
from pathlib import Path
import assets.lora_adapter as asset_module
import test_faults
point, data_dir, uri, model_dir = sys.argv[1:]
asset_module.send_training = test_faults.die_at(point)
test_faults.run_pipeline(Path(data_dir), uri, Path(model_dir), max_steps=8, save_every=4, eval_every=4)
sys.exit(3)  # not killed
"""


def test_a_training_whose_process_died_before_its_mlflow_run_ended_is_finished_by_the_next(
    data_dir, tmp_path, tiny_model_dir
):
    """The adapter is on disk, its MLflow run still RUNNING, no pending marker: what a SIGKILL after
    the child wrote the adapter leaves. Killed before the upload (the training run), then halfway
    through the metrics and before the end (two cache hits sending what was missing), each a real
    SIGKILL of the run's process; the next materialization sends the rest, ends the run FINISHED,
    every step once, and registers."""
    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "tests"), str(PROJECT)])}
    for point in KILL_POINTS:
        cmd = [sys.executable, "-c", KILLED_RUN, point, str(data_dir), uri, str(tiny_model_dir)]
        killed = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
        assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-3000:])
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.info.status == "RUNNING", point
        adapters = list((data_dir / "models" / "adapters").iterdir())
        assert len(adapters) == 1 and not (adapters[0] / PENDING).exists()
    sent = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert sent == list(range(1, 9))  # the halfway kill's points were not sent twice by the later run

    second = run_pipeline(data_dir, uri, tiny_model_dir, max_steps=8, save_every=4, eval_every=4)
    assert second.success, [str(e.event_specific_data.error)[:2000] for e in second.all_events if e.is_step_failure]
    assert (
        meta(second, "lora_adapter", "cache_hit") is True
        and meta(second, "lora_adapter", "mlflow_tracking") == "complete"
    )
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == list(range(1, 9))
    assert {"adapter/adapter_model.safetensors"} <= {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert meta(second, "registered_model", "registered") is True
