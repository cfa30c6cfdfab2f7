"""Training past one machine: ``num_nodes`` / ``node_rank`` / ``rdzv_endpoint`` reach torchrun and
accelerate launch; two "nodes" of one process each on loopback (two launchers meeting at a c10d
rendezvous on 127.0.0.1) train one adapter whose loss curve matches a one-node two-process run."""

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import demo_records
from pipeline.stages.lora_adapter import TrainSpec, read_metrics
from pipeline.stages.lora_adapter.distributed import LaunchError, launch_command
from pipeline.stages.tokenized_dataset import tokenize_dataset

pytestmark = pytest.mark.slow  # torchrun launchers: make test, not make test-fast

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_settings_reach_the_launchers():
    spec = Path("/tmp/spec.json")
    cmd = launch_command(spec, num_processes=4, num_nodes=2, node_rank=1, rdzv_endpoint="10.0.0.5:29400", run_id="abc")
    assert cmd[0].endswith("torchrun") and "--standalone" not in cmd
    assert cmd[1:11] == [
        "--nnodes",
        "2",
        "--node_rank",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "10.0.0.5:29400",
        "--rdzv_id",
        "abc",
    ]
    assert cmd[11:13] == ["--nproc_per_node", "4"]
    acc = launch_command(
        spec, num_processes=4, num_nodes=2, node_rank=1, rdzv_endpoint="10.0.0.5:29400", accelerate_config="fsdp.yaml"
    )
    assert acc[1:4] == ["launch", "--num_processes", "8"]  # accelerate counts every machine's processes
    assert acc[6:14] == [
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.0.0.5",
        "--main_process_port",
        "29400",
    ]
    assert launch_command(spec)[1:3] == ["-m", "pipeline.stages.lora_adapter"]
    with pytest.raises(LaunchError, match="set rdzv_endpoint"):
        launch_command(spec, num_nodes=2)
    with pytest.raises(LaunchError, match="node_rank 2 is not one of 0..1"):
        launch_command(spec, num_nodes=2, node_rank=2, rdzv_endpoint="h:1")


def start(cmd, log: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def wait(procs, timeout=300):
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("training timed out")


def test_two_nodes_on_loopback_train_like_one_node_with_two_processes(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    df = pd.DataFrame(demo_records(16))
    df.insert(0, "record_id", [f"r{i}" for i in range(len(df))])
    df["split"] = ["eval" if i % 4 == 0 else "train" for i in range(len(df))]
    ds = tokenize_dataset(
        df,
        tok,
        data_fingerprint="n",
        tokenizer_fingerprint="n",
        out_root=tmp_path / "tok",
        max_seq_len=256,
        system_prompt="你是助手。",
    )

    def spec(name: str) -> Path:
        path = tmp_path / f"{name}.json"
        TrainSpec(
            base_model_path=str(tiny_model_dir),
            tokenized_path=ds.path,
            output_dir=str(tmp_path / name / "out"),
            checkpoint_dir=str(tmp_path / name / "ckpt"),
            max_steps=4,
            r=8,
            lora_alpha=16,
            learning_rate=5e-3,
            precision="fp32",
            compile=False,
            log_every=1,
            eval_every=4,
            save_every=100,
        ).dump(path)
        return path

    one = start(launch_command(spec("one"), num_processes=2, launcher="torchrun"), tmp_path / "one.log")
    wait([one])
    assert one.returncode == 0, (tmp_path / "one.log").read_text()[-3000:]

    endpoint = f"127.0.0.1:{free_port()}"
    path = spec("two")
    nodes = [
        start(
            launch_command(path, num_processes=1, num_nodes=2, node_rank=k, rdzv_endpoint=endpoint, run_id="t"),
            tmp_path / f"node{k}.log",
        )
        for k in (0, 1)
    ]
    wait(nodes)
    for k, p in enumerate(nodes):
        assert p.returncode == 0, (tmp_path / f"node{k}.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"node{k}.log").read_text() for k in (0, 1))
    assert "2 process(es)" in logs and logs.count("RESULT ") == 1  # one world of two; rank 0 alone reports

    curves = {}
    for name in ("one", "two"):
        points = [m for m in read_metrics(tmp_path / name / "ckpt" / "metrics.jsonl") if "train_loss" in m]
        curves[name] = [m["train_loss"] for m in points]
    assert len(curves["one"]) == len(curves["two"]) == 4
    assert curves["two"] == pytest.approx(curves["one"], rel=1e-4)
    result = json.loads(logs.split("RESULT ", 1)[1].splitlines()[0])
    assert result["processes"] == 2 and (tmp_path / "two" / "out" / "adapter_model.safetensors").is_file()
