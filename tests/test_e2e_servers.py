"""End to end against the real servers, started the way `make ui` starts them (``pipeline.ops.ui``):
`dagster dev` (webserver + daemon) and an MLflow server on free loopback ports, with temporary
homes, data dir and artifact folder, the Dagster instance and the MLflow store on a real PostgreSQL
server (``MEDTUNE_POSTGRES_URL``, the ``postgres`` fixture); the tiny model.

What several tests share is built once by a module fixture, so any test runs alone or in any
order: ``built`` (full_pipeline_job launched through Dagster's GraphQL API, polled to success),
``sensor_run`` (a new data file dropped in, the run the sensor launched), ``second_webserver`` (a
teammate's webserver over the same PostgreSQL instance), ``served`` (`make serve` over the
champion) and ``made`` (`make run`'s commands and `make ask` with passwords planted). The tests
check the MLflow run, metrics, adapter and registration through MLflow's REST API; one sensor run
per content change; the asset graph and the model page in a real headless Chromium (screenshots
under ``test-artifacts/``); loopback-only servers; the same runs seen by both webservers and kept
in PostgreSQL; two trainings requested at once running one at a time; the default `make ui` on
SQLite files starting and stopping; `make serve`'s answers; no password in any output.

Every server is stopped at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import demo_records, model_in_data_root, write_json
from pipeline.ops.automation import SENSOR

pytestmark = (
    pytest.mark.slow
)  # real servers (Dagster, MLflow, PostgreSQL) and the browser: make test, not make test-fast

PROJECT = Path(__file__).resolve().parents[1]
ARTIFACTS = PROJECT / "test-artifacts"
ASSETS = [
    "raw_records",
    "validated_records",
    "deduplicated_records",
    "rejected_records",
    "alpaca_dataset",
    "base_model",
    "tokenized_dataset",
    "lora_adapter",
    "evaluation_report",
    "merged_model",
    "registered_model",
]
SWEEP_ASSETS = ["sweep_plan", "sweep_trial", "sweep_comparison"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(base + "/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())
    assert "errors" not in out, out
    return out["data"]


def wait_until_ready(proc: subprocess.Popen, ready: threading.Event, lines: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready.is_set():
        assert proc.poll() is None, "pipeline.ops.ui exited:\n" + "".join(lines)
        assert time.monotonic() < deadline, f"pipeline.ops.ui not ready in {timeout:.0f} s:\n" + "".join(lines)
        time.sleep(0.5)


@dataclass
class Stack:
    dagster: str
    mlflow: str
    data_dir: Path
    tiny_model: str  # relative to the data root
    logs: Path
    env: dict
    root: Path
    postgres: object  # tests/pg_server.PostgresServer

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        return graphql(self.dagster, query, variables)

    def mlflow_get(self, endpoint: str, **params) -> dict:
        url = f"{self.mlflow}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())

    def mlflow_post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.mlflow}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log"))
        )


def start_ui(
    env: dict, logs: Path, dagster_port: int, mlflow_port: int
) -> tuple[subprocess.Popen, threading.Event, list[str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.ops.ui",
            "--dagster-port",
            str(dagster_port),
            "--mlflow-port",
            str(mlflow_port),
            "--log-dir",
            str(logs),
        ],
        cwd=PROJECT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY"):
                ready.set()

    threading.Thread(target=reader, daemon=True).start()
    return proc, ready, lines


def stop_ui(proc: subprocess.Popen, logs: Path, ports: tuple[int, ...]) -> bool:
    """Stop it the way Ctrl-C stops `make ui`; True when nothing listens on ``ports`` afterwards."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    pids = json.loads((logs / "pids.json").read_text()) if (logs / "pids.json").is_file() else {}
    for pid in [proc.pid, *pids.values()]:
        try:
            os.killpg(pid, signal.SIGKILL)  # nothing should be left; make sure
        except (ProcessLookupError, PermissionError):
            pass
    return not any(port_open(p) for p in ports)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, postgres):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    write_json(data / "raw" / "demo.json", demo_records(24))
    logs = root / "logs"
    dagster_port, mlflow_port = free_port(), free_port()
    postgres.create_database("e2e")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(root / "dagster_home"),
        "MEDTUNE_DATA_DIR": str(data),
        "MEDTUNE_POSTGRES_URL": postgres.url("e2e"),
        "MEDTUNE_ARTIFACT_ROOT": str(root / "shared-artifacts"),
    }
    env.pop("MLFLOW_TRACKING_URI")  # the conftest's SQLite store; here MEDTUNE_POSTGRES_URL chooses
    proc, ready, lines = start_ui(env, logs, dagster_port, mlflow_port)
    try:
        wait_until_ready(proc, ready, lines)
        model = model_in_data_root(tiny_model_dir, data)
        yield Stack(
            f"http://127.0.0.1:{dagster_port}",
            f"http://127.0.0.1:{mlflow_port}",
            data,
            model,
            logs,
            env,
            root,
            postgres,
        )
    finally:
        stopped = stop_ui(proc, logs, (dagster_port, mlflow_port))
        ARTIFACTS.mkdir(exist_ok=True)
        for p in logs.glob("*.log"):
            shutil.copyfile(p, ARTIFACTS / f"e2e-{p.name}")
        assert stopped, "a server is still listening after the shutdown"


def run_config(stack: Stack) -> dict:
    return {
        "execution": {"config": {"in_process": {}}},
        "ops": {
            "base_model": {"config": {"model": str(stack.tiny_model)}},
            "tokenized_dataset": {"config": {"max_seq_len": 256}},
            # r 16: on the tiny model (hidden size 64) the default r 64 is full rank and lr 5e-3 overshoots
            "lora_adapter": {
                "config": {
                    "max_steps": 6,
                    "save_every": 3,
                    "eval_every": 3,
                    "learning_rate": 5e-3,
                    "precision": "fp32",
                    "r": 16,
                    "lora_alpha": 32,
                    "compile": False,
                }
            },
            "evaluation_report": {"config": {"max_new_tokens": 8, "train_sample_size": 4}},
        },
    }


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
  }
}"""
STATUS = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
SENSOR_RUNS = """
query { runsOrError(filter: {tags: [{key: "medtune/trigger", value: "raw_data_sensor"}]}) {
  ... on Runs { results { runId status } } } }"""


def wait_for_run(stack: Stack, run_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = stack.graphql(STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout:.0f} s\n{stack.log_tail()}")


SENSOR_TICKS = """
query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
  ... on Sensor { sensorState { ticks(limit: 100) { timestamp status } } } } }"""


def sensor_runs(stack: Stack) -> list[dict]:
    return stack.graphql(SENSOR_RUNS)["runsOrError"]["results"]


def sensor_ticks(stack: Stack) -> list[float]:
    selector = {
        "repositoryLocationName": "medtune",
        "repositoryName": "__repository__",
        "sensorName": "raw_data_sensor",
    }
    ticks = stack.graphql(SENSOR_TICKS, {"s": selector})["sensorOrError"]["sensorState"]["ticks"]
    return [t["timestamp"] for t in ticks if t["status"] in ("SUCCESS", "SKIPPED")]


def wait_for_ticks(stack: Stack, after: float, n: int, timeout: float = 120) -> None:
    """Until the daemon has evaluated the sensor ``n`` times since ``after`` (a wall-clock time)."""
    deadline = time.monotonic() + timeout
    while sum(t > after for t in sensor_ticks(stack)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} sensor ticks in {timeout:.0f} s\n" + stack.log_tail()
        time.sleep(0.5)


def champion(stack: Stack) -> dict:
    return stack.mlflow_get("registered-models/alias", name="medtune", alias="champion")["model_version"]


@pytest.fixture(scope="module")
def built(stack) -> str:
    """The whole pipeline launched through GraphQL, as the UI's Materialize does, on the demo rows:
    its run id. Every test that needs a trained, registered model asks for it."""
    params = {
        "selector": {
            "repositoryLocationName": "medtune",
            "repositoryName": "__repository__",
            "jobName": "full_pipeline_job",
        },
        "runConfigData": run_config(stack),
    }
    launched = stack.graphql(LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    assert wait_for_run(stack, run_id) == "SUCCESS", stack.log_tail()
    return run_id


@pytest.fixture(scope="module")
def sensor_run(stack, built) -> dict:
    """New raw data dropped into the folder after the first build: the run the sensor launched, finished."""
    assert sensor_runs(stack) == []  # the first build was launched by hand
    write_json(stack.data_dir / "raw" / "incoming" / "new batch.json", demo_records(30)[24:])
    deadline = time.monotonic() + 120
    while not sensor_runs(stack):
        assert time.monotonic() < deadline, "the sensor launched no run\n" + stack.log_tail()
        time.sleep(0.5)
    (run,) = sensor_runs(stack)
    assert wait_for_run(stack, run["runId"]) == "SUCCESS", stack.log_tail()
    return run


def mlflow_run_of(stack: Stack, dagster_run_id: str) -> dict:
    """The MLflow run a Dagster run trained (tagged with its id)."""
    exp = stack.mlflow_get("experiments/get-by-name", experiment_name="medtune")["experiment"]
    runs = stack.mlflow_post(
        "runs/search",
        {"experiment_ids": [exp["experiment_id"]], "filter": f"tags.`dagster.run_id` = '{dagster_run_id}'"},
    )
    (run,) = runs["runs"]
    return run


def registered_versions(stack: Stack) -> list[dict]:
    return stack.mlflow_get("model-versions/search", filter="name='medtune'")["model_versions"]


def test_a_run_launched_through_graphql_is_tracked_and_registered_in_mlflow(stack, built):
    run = mlflow_run_of(stack, built)
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"train_loss", "eval_loss", "base_eval_loss", "tuned_eval_loss", "tuned_eval_rouge_l"} <= set(metrics)
    files = stack.mlflow_get("artifacts/list", run_id=run["info"]["run_id"], path="adapter")["files"]
    assert "adapter/adapter_model.safetensors" in {f["path"] for f in files}
    assert run["info"]["run_id"] in {v["run_id"] for v in registered_versions(stack)}


def test_the_sensor_retrains_once_per_content_change(stack, sensor_run):
    wait_for_ticks(stack, time.time(), 2)  # sensor evaluations since its run: still one run
    assert len(sensor_runs(stack)) == 1
    # the sensor's run registered a new version, nobody clicked
    assert mlflow_run_of(stack, sensor_run["runId"])["info"]["run_id"] in {
        v["run_id"] for v in registered_versions(stack)
    }

    # the same content rewritten, and touched: nothing to do
    f = stack.data_dir / "raw" / "demo.json"
    f.write_bytes(f.read_bytes())
    os.utime(f)
    # ticks past the quiet period (the sensor waits for files to stop changing), then two more
    wait_for_ticks(stack, time.time() + float(SENSOR["quiet_seconds"]), 2)
    assert len(sensor_runs(stack)) == 1


def test_the_browser_sees_the_asset_graph_and_the_champion(stack, built):
    from playwright.sync_api import expect

    from pipeline.ops.screenshots import (
        browser_page,
        graph_node_names,
        open_asset,
        open_asset_graph,
        open_registered_model,
    )

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page() as page:
        open_asset_graph(page, stack.dagster)
        for name in ASSETS + SWEEP_ASSETS:  # the asset tree shows full names
            expect(page.locator(f'[title="{name}"]').first).to_be_visible(timeout=60000)
        # the graph draws the pipeline's assets (the sweep group's may lie outside the visible area,
        # which the graph does not render)
        expect(page.locator("[class*=AssetNode_assetName]").nth(len(ASSETS) - 1)).to_be_attached(timeout=30000)
        assert set(graph_node_names(page)) >= set(ASSETS) - {"deduplicated_records"}  # shortened in the graph
        page.screenshot(path=str(ARTIFACTS / "dagster-asset-graph.png"))

        open_asset(page, stack.dagster, "evaluation_report")
        expect(page.get_by_text("tuned_beats_base").first).to_be_visible(timeout=60000)
        expect(page.get_by_text("side_by_side").first).to_be_visible(timeout=60000)
        page.screenshot(path=str(ARTIFACTS / "dagster-evaluation-report.png"), full_page=True)

        open_registered_model(page, stack.mlflow)
        expect(page.get_by_text("champion").first).to_be_visible(timeout=60000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-model-page.png"), full_page=True)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port``, read from /proc/net/tcp{,6}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, 32, 8))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def test_servers_listen_on_loopback_only(stack):
    for url in (stack.dagster, stack.mlflow):
        port = int(url.rsplit(":", 1)[1])
        addresses = listening_addresses(port)
        assert addresses, f"nothing listens on {port}"
        assert addresses <= {"127.0.0.1", "::1"}, f"port {port} listens on {addresses}"


@pytest.fixture(scope="module")
def second_webserver(stack):
    """A teammate's Dagster webserver: its own home, the same PostgreSQL instance (Dagster runs one daemon
    per instance: the stack's)."""
    from pipeline.ops.instance import ensure_dagster_home

    # started by hand, as a teammate would: the instance settings name no password, libpq reads PGPASSWORD
    env = {**stack.env, "DAGSTER_HOME": str(stack.root / "dagster_home_b"), "PGPASSWORD": stack.postgres.password}
    ensure_dagster_home(stack.root / "dagster_home_b", env)
    port = free_port()
    with open(stack.logs / "webserver-b.log", "ab") as log:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-webserver"),
                "-w",
                str(PROJECT / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=PROJECT,
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "the second webserver exited\n" + stack.log_tail()
            try:
                with urllib.request.urlopen(url + "/server_info", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the second webserver was not ready in 180 s\n" + stack.log_tail()
                time.sleep(0.5)
        yield url
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


RUNS = "query { runsOrError { ... on Runs { results { runId status startTime endTime } } } }"
INSTANCE = "query { instance { info } }"


def test_a_second_webserver_sees_the_same_runs_kept_in_postgresql(stack, second_webserver, sensor_run):
    runs_a = graphql(stack.dagster, RUNS)["runsOrError"]["results"]
    runs_b = graphql(second_webserver, RUNS)["runsOrError"]["results"]
    assert len(runs_a) >= 2 and runs_a == runs_b  # the manual run and the sensor's
    for base in (stack.dagster, second_webserver):
        assert "PostgresRunStorage" in (graphql(base, INSTANCE)["instance"]["info"] or "")
    # the rows are in PostgreSQL, nothing in SQLite files
    assert {r for (r,) in stack.postgres.query("e2e", "SELECT run_id FROM runs")} == {r["runId"] for r in runs_a}
    (finished,) = stack.postgres.query("e2e_mlflow", "SELECT count(*) FROM runs WHERE status = 'FINISHED'")
    assert finished[0] >= 2
    assert stack.postgres.query("e2e_mlflow", "SELECT name FROM registered_models") == [("medtune",)]
    assert not list(stack.root.rglob("*.db")), list(stack.root.rglob("*.db"))
    for home in ("dagster_home", "dagster_home_b"):  # the server wants a password; no file holds it
        assert stack.postgres.password not in (stack.root / home / "dagster.yaml").read_text()
    assert list((stack.root / "shared-artifacts").rglob("adapter_model.safetensors"))  # artifacts on the shared path


def test_two_trainings_requested_at_once_run_one_at_a_time(stack, second_webserver, built):
    launched = []
    for seed, base in ((11, stack.dagster), (12, second_webserver)):  # different seeds: two real trainings
        params = {
            "selector": {
                "repositoryLocationName": "medtune",
                "repositoryName": "__repository__",
                "jobName": "train_job",
                "assetSelection": [{"path": ["lora_adapter"]}],
            },
            "runConfigData": {
                "execution": {"config": {"in_process": {}}},
                "ops": {
                    "lora_adapter": {
                        "config": {**run_config(stack)["ops"]["lora_adapter"]["config"], "max_steps": 2, "seed": seed}
                    }
                },
            },
        }
        out = graphql(base, LAUNCH, {"params": params})["launchRun"]
        assert out["__typename"] == "LaunchRunSuccess", out
        launched.append(out["run"]["runId"])
    for run_id in launched:
        assert wait_for_run(stack, run_id) == "SUCCESS", stack.log_tail()
    runs = {r["runId"]: r for r in graphql(second_webserver, RUNS)["runsOrError"]["results"]}
    (a0, a1), (b0, b1) = sorted((runs[r]["startTime"], runs[r]["endTime"]) for r in launched)
    assert a1 <= b0, f"the two training runs overlapped: {a0}-{a1} and {b0}-{b1}"
    # each training also held the pool's slot as a PostgreSQL advisory lock (pipeline/core/pool_limit.py)
    held = stack.postgres.query(
        "e2e",
        "SELECT run_id FROM event_logs WHERE step_key = 'lora_adapter' AND event LIKE "
        "'%holding medtune_training slot 1 of 1 among the instance''s machines (PostgreSQL advisory lock)%'",
    )
    assert set(launched) <= {r for (r,) in held}, held  # (the earlier tests' trainings held it too)


def test_the_default_make_ui_on_sqlite_files_starts_and_stops(tmp_path):
    logs = tmp_path / "logs"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "MEDTUNE_DATA_DIR": str(tmp_path / "data"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
    }
    ports = free_port(), free_port()
    proc, ready, lines = start_ui(env, logs, *ports)
    try:
        wait_until_ready(proc, ready, lines)
        assert any("SQLite files in the home" in line for line in lines), lines
        assert "storage:" not in (tmp_path / "home" / "dagster.yaml").read_text()
        assert graphql(f"http://127.0.0.1:{ports[0]}", RUNS)["runsOrError"]["results"] == []
        assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    finally:
        assert stop_ui(proc, logs, ports), "a server is still listening after the shutdown"


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def served(stack, built):
    """`make serve`'s code path (pipeline.ops.serve) over the champion, on a free loopback port: its
    /invocations URL while it runs; stopped as Ctrl-C stops it, and its port closed, at the end."""
    port, log = free_port(), stack.logs / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.ops.serve", "--port", str(port), "--max-tokens", "16"],
        cwd=PROJECT,
        env=stack.env,
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.monotonic() + 240
        while not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "make serve did not start\n" + log.read_text()[-5000:]
            )
            time.sleep(0.5)
        said = log.read_text()
        assert f"on {url}" in said and "request timeout" in said, said
        yield url, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C would
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while port_open(port) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not port_open(port), "make serve's server still listens 30 s after SIGTERM"


def test_make_serve_answers_the_chat_completions_schema_over_http(stack, served):
    """A chat request answers in the chat-completions shape with what the pyfunc itself answers, a
    list of questions answers too, bad requests get a 400 that says why."""
    from mlflow.types.llm import ChatCompletionResponse

    import mlflow
    from pipeline.core.stores import tracking_uri
    from pipeline.stages.registered_model import _uris

    url, log = served
    version = re.search(r"medtune version (\d+)", log.read_text()).group(
        1
    )  # what it serves (the champion when it started)
    question = "咳嗽，咽喉肿痛，用什么中成药？"
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 12}
    status, answer = post_json(url, chat)
    assert status == 200, answer
    parsed = ChatCompletionResponse.from_dict(answer)  # MLflow's own chat-completions type
    assert answer["object"] == "chat.completion" and parsed.choices[0].message.role == "assistant"
    assert (
        answer["choices"][0]["finish_reason"] in ("stop", "length") and 1 <= answer["usage"]["completion_tokens"] <= 12
    )
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    content = answer["choices"][0]["message"]["content"]

    with _uris(tracking_uri(stack.env)):  # the pyfunc itself, loaded from the registry
        own = mlflow.pyfunc.load_model(f"models:/medtune/{version}").predict(
            {"messages": chat["messages"]}, params={"max_tokens": 12}
        )
    assert own["choices"][0]["message"]["content"] == content  # the server answers what the model answers

    status, plain = post_json(url, {"inputs": [question], "params": {"max_tokens": 12}})
    assert status == 200 and plain == {"predictions": [content]}, plain  # same prompt, same greedy answer

    from openai import OpenAI  # the OpenAI SDK on the same server, the model by the name it was served under

    client = OpenAI(base_url=url.removesuffix("/invocations") + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["medtune@champion"]
    sdk = client.chat.completions.create(model="medtune@champion", messages=chat["messages"], max_tokens=12)
    assert sdk.choices[0].message.content == content

    for body, said in [
        ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role must be one of system, user, assistant"),
        ({"messages": "hi"}, '"messages" must be a non-empty list'),
        ({"messages": chat["messages"], "max_tokens": "lots"}, "max_tokens"),
        ({"messages": chat["messages"], "stream": True}, '"stream": true is not served'),
        ({"messages": chat["messages"], "logprobs": True}, "unknown chat-completions fields: logprobs"),
    ]:
        status, error = post_json(url, body)
        assert status == 400 and said in error.get("message", ""), (body, status, error)


TRACKING_PASSWORD = "tr@ck-s3cret'pw"  # a quote and an @, as people's passwords have


@pytest.fixture(scope="module")
def made(stack, built) -> dict[str, subprocess.CompletedProcess]:
    """`make run`'s three commands and `make ask`, with the PostgreSQL password in the instance's URL
    (and PGPASSWORD, as the Makefile sets it) and another in an http tracking URI's ``user:pass@``
    (the MLflow server make ui started; it takes the Authorization header and ignores it): each
    command's result, its output also kept under the stack's logs."""
    quoted = urllib.parse.quote(TRACKING_PASSWORD, safe="")
    env = {
        **stack.env,
        "PGPASSWORD": stack.postgres.password,
        "MLFLOW_TRACKING_URI": stack.mlflow.replace("http://", f"http://medtune:{quoted}@"),
    }
    commands = {
        "recover": [sys.executable, "-m", "pipeline.ops.recover"],
        "materialize": [
            str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "pipeline.definitions",
            "--select", "not group:sweep", "--config-json", json.dumps(run_config(stack)),
        ],
        "summary": [sys.executable, "-m", "pipeline.ops.summary"],
        "ask": [
            *(sys.executable, "-m", "pipeline.ask", "咳嗽，咽喉肿痛，用什么中成药？"),
            *("--model", "champion", "--max-new-tokens", "4"),
        ],
    }  # fmt: skip
    done = {}
    for name, cmd in commands.items():
        done[name] = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
        (stack.logs / f"make-run-{name}.log").write_text(done[name].stdout + done[name].stderr)
    return done


def test_make_run_and_make_ask_print_no_password(stack, made):
    """Both succeed with the passwords planted, and neither password is in their stdout or stderr
    (test_no_password_in_any_output looks for both in every run, event and MLflow record)."""
    quoted = urllib.parse.quote(TRACKING_PASSWORD, safe="")
    for name, done in made.items():
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"{name} failed:\n{said[-4000:]}"
        for secret in (stack.postgres.password, TRACKING_PASSWORD, quoted):
            assert secret not in said, f"{name} printed a password"
    assert "champion" in made["summary"].stdout


def test_no_password_in_any_output(stack, monkeypatch, built, sensor_run, second_webserver, served, made):
    """After make ui, the runs, the sensor's run, a second webserver, make serve, make run and make
    ask over a PostgreSQL store whose URL carries a password (and the tracking password): neither
    is in any log of those servers and commands, any process's arguments, any event, tag or metadata
    of any Dagster run, any MLflow param, tag or description."""
    from dagster import DagsterInstance
    from mlflow.tracking import MlflowClient

    password = stack.postgres.password
    secrets = (password, TRACKING_PASSWORD, urllib.parse.quote(TRACKING_PASSWORD, safe=""))
    leaks = [p.name for p in stack.logs.glob("*.log") if any(s in p.read_text(errors="replace") for s in secrets)]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if any(s.encode() in cmdline.read_bytes() for s in secrets):
                leaks.append(f"arguments of pid {cmdline.parent.name}")
        except OSError:
            continue
    monkeypatch.setenv("PGPASSWORD", password)
    instance = DagsterInstance.from_config(stack.env["DAGSTER_HOME"])
    try:
        runs = instance.get_runs()
        assert runs
        for run in runs:
            if any(s in json.dumps(run.tags) + json.dumps(run.run_config, default=str) for s in secrets):
                leaks.append(f"run {run.run_id} tags or config")
            events = instance.all_logs(run.run_id)
            leaks += [
                f"run {run.run_id} event {e.dagster_event_type}" for e in events if any(s in str(e) for s in secrets)
            ]
    finally:
        instance.dispose()
    client = MlflowClient(stack.mlflow, registry_uri=stack.mlflow)
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found
    for r in found:
        if any(s in json.dumps([r.data.params, r.data.tags]) for s in secrets):
            leaks.append(f"MLflow run {r.info.run_id}")
    for v in client.search_model_versions():
        if any(s in json.dumps([v.tags, v.description or ""]) for s in secrets):
            leaks.append(f"model version {v.version}")
    assert not leaks, leaks
