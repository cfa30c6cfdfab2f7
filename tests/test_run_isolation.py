"""Every run reads exactly what its upstream produced: a data run rewriting the data folder while
another run trains, three whole pipelines at once over different raw data, and the pruning of
run folders nothing reads any more (resources/stage_io.py, pipeline/ops/run_data.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT_ROOT, TRAINING_HALF, demo_records, materialize_command, rec, training_spans, write_json
from pipeline.core.atomic import file_semaphore
from pipeline.core.fingerprint import sha256_file
from resources import DataRoot

EVAL_OPS = {"evaluation_report": {"config": {"max_new_tokens": 4, "train_sample_size": 2}}}
WITH_EVALUATION = f"{TRAINING_HALF},evaluation_report"


def variant(n: int, tag: str) -> list[dict]:
    """Demo records whose every case reads differently (so every record id differs)."""
    return [rec(r["input"].replace("病例", f"病例{tag}"), r["output"]) for r in demo_records(n)]


def wait_for(predicate, proc, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()[-4000:] if proc.stdout else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_folders(data_dir: Path) -> dict[str, Path]:
    runs = data_dir / "processed" / "runs"
    return {p.name: p for p in runs.iterdir() if p.is_dir()} if runs.is_dir() else {}


def descriptor(folder: Path, asset: str) -> dict:
    return json.loads((folder / f"{asset}.json").read_text())


def evaluated_ids(data_dir: Path, adapter_id: str) -> dict[str, set[str]]:
    """The record ids each split of adapter ``adapter_id``'s evaluation scored."""
    out: dict[str, set[str]] = {}
    for folder in (data_dir / "models" / "evaluations").iterdir():
        table = folder / "evaluation.json"
        if table.is_file() and json.loads((folder / "summary.json").read_text())["adapter_id"] == adapter_id:
            df = pd.read_json(table, orient="records")
            for split, ids in df.groupby("split")["record_id"]:
                out.setdefault(split, set()).update(ids)
    return out


def assert_cache_entries_hold_their_keys(data_dir: Path) -> None:
    """Every tokenized entry holds the rows of the Alpaca file its manifest names (by fingerprint)."""
    alpaca = {sha256_file(p): p for p in (data_dir / "processed" / "runs").glob("*/alpaca.parquet")}
    entries = [p for p in (data_dir / "processed" / "tokenized").iterdir() if (p / "manifest.json").is_file()]
    assert entries
    for entry in entries:
        manifest = json.loads((entry / "manifest.json").read_text())
        source = alpaca.get(manifest["data_fingerprint"])
        assert source is not None, f"{entry.name} names data {manifest['data_fingerprint'][:12]} that no run wrote"
        want = pd.read_parquet(source, columns=["record_id", "split"])
        for split in ("train", "eval"):
            got = set(pd.read_parquet(entry / f"{split}.parquet", columns=["record_id"])["record_id"])
            assert got == set(want.loc[want["split"] == split, "record_id"]), (
                f"{entry.name} {split} holds other rows than its key says"
            )


@pytest.mark.slow
def test_a_training_run_scores_its_own_rows_while_a_data_run_rewrites_the_folder(tmp_path, tiny_model_dir):
    """Run 1 (data, training, evaluation) waits for the training slot; meanwhile the raw data
    changes and a data run over the same data folder finishes. Run 1 then trains and evaluates on
    exactly its own rows, and every cache entry holds what its key says."""
    data_dir = tmp_path / "data"
    write_json(data_dir / "raw" / "demo.json", variant(24, "A"))
    cmd, env, home = materialize_command(
        data_dir, tmp_path, tiny_model_dir, select=WITH_EVALUATION, ops=EVAL_OPS, max_steps=4, save_every=2
    )
    data_cmd, _, _ = materialize_command(
        data_dir,
        tmp_path,
        tiny_model_dir,
        select="raw_records,validated_records,deduplicated_records,rejected_records,alpaca_dataset",
    )
    slot = file_semaphore(home / "pool_slots" / "medtune_training", 1)
    slot.__enter__()  # the training slot is taken: run 1 stops at lora_adapter, its data written
    try:
        first = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        wait_for(
            lambda: any((f / "tokenized_dataset.json").is_file() for f in run_folders(data_dir).values()),
            first,
            "run 1's tokenized data",
        )
        (run1,) = run_folders(data_dir)
        write_json(data_dir / "raw" / "demo.json", variant(30, "B"))
        second = subprocess.run(data_cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    finally:
        slot.__exit__(None, None, None)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out[-4000:]

    (run2,) = set(run_folders(data_dir)) - {run1}
    mine = pd.read_parquet(descriptor(run_folders(data_dir)[run1], "alpaca_dataset")["path"])
    theirs = pd.read_parquet(data_dir / "processed" / "alpaca.parquet")  # the latest: run 2's
    assert set(theirs["record_id"]).isdisjoint(mine["record_id"]) and len(theirs) > len(mine)
    adapter = descriptor(run_folders(data_dir)[run1], "lora_adapter")
    scored = evaluated_ids(data_dir, adapter["adapter_id"])
    assert scored["eval"] == set(mine.loc[mine["split"] == "eval", "record_id"])
    assert scored["train_sample"] <= set(mine.loc[mine["split"] == "train", "record_id"])
    assert_cache_entries_hold_their_keys(data_dir)


@pytest.mark.slow
def test_three_whole_pipelines_at_once_over_different_raw_data(tmp_path, tiny_model_dir):
    """`dagster asset materialize` of the whole pipeline on one instance and one data folder: A and
    A' (the same data, so the same adapter) together, then B and C, each once the ones before have
    read the raw files, the raw data changed in between. No step fails from a race; of A and A', one
    trains and the other waits on the adapter's lock and finds it (a cache hit); the three trainings
    held the training slot one at a time (Dagster's pool claim on SQLite can let two runs in at the
    same instant, as CI once saw: the slot is also a lock file, pipeline/core/pool_limit.py); each
    run's evaluation scored its own rows; each registered version carries its own run's data."""
    data_dir = tmp_path / "data"
    procs = []
    for i, tag in enumerate(["A", "A", "B", "C"]):
        write_json(data_dir / "raw" / "demo.json", variant(20 + 2 * "ABC".index(tag), tag))
        cmd, env, home = materialize_command(
            data_dir, tmp_path, tiny_model_dir, select="not group:sweep", ops=EVAL_OPS, max_steps=4, save_every=2
        )
        if i == 0:
            from dagster import DagsterInstance

            DagsterInstance.from_config(
                str(home)
            ).dispose()  # the instance's tables exist before all start (as with make ui)
            MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
        procs.append(
            subprocess.Popen(
                cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
        if i == 0:
            continue  # A' starts with A
        wait_for(
            lambda n=i + 1: sum((f / "raw_records.json").is_file() for f in run_folders(data_dir).values()) >= n,
            procs[-1],
            f"run {i + 1}'s raw records",
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "".join(o[-3000:] for o in outs)
    assert sum("cache hit: adapter" in out for out in outs[:2]) == 1  # of A and A', one trained it
    spans = training_spans(home)  # three adapters, trained one at a time (the pool and its lock file)
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = {v.tags.get("medtune.adapter_id"): v for v in client.search_model_versions()}
    folders = run_folders(data_dir)
    assert len(folders) == 4 and versions, "four runs, and at least one registered version to check"
    seen = set()
    for folder in folders.values():
        alpaca = pd.read_parquet(descriptor(folder, "alpaca_dataset")["path"])
        adapter = descriptor(folder, "lora_adapter")
        tokenized = descriptor(folder, "tokenized_dataset")
        scored = evaluated_ids(data_dir, adapter["adapter_id"])
        assert scored["eval"] == set(alpaca.loc[alpaca["split"] == "eval", "record_id"])
        version = versions.get(adapter["adapter_id"])
        if version is not None:  # registered unless its gate failed (tiny model, 4 steps)
            assert version.tags["medtune.data_fingerprint"] == tokenized["key"]
        seen.add(frozenset(alpaca["record_id"]))
    a, b, c = seen  # A and A' read the same rows; B and C their own
    assert not (a & b or b & c or a & c)
    assert not list(data_dir.rglob(".tmp-*"))
    assert_cache_entries_hold_their_keys(data_dir)


class FakeInstance:
    """What prune_run_data asks of a Dagster instance: runs and the latest materialization of each asset."""

    def __init__(self, runs: dict[str, bool], latest: dict[str, str]):
        self.runs, self.latest = runs, latest

    def get_run_by_id(self, run_id):
        return type("Run", (), {"is_finished": self.runs[run_id]})() if run_id in self.runs else None

    def get_latest_materialization_event(self, key):
        run_id = self.latest.get(key.path[-1])
        return type("Event", (), {"run_id": run_id})() if run_id else None


def test_pruning_keeps_what_a_run_can_still_read(tmp_path):
    from pipeline.ops.run_data import UNKNOWN_RUN_GRACE_S, prune_run_data

    runs = tmp_path / "processed" / "runs"

    def folder(run_id, **descriptors):
        (runs / run_id).mkdir(parents=True)
        for name, payload in descriptors.items():
            (runs / run_id / f"{name}.json").write_text(json.dumps(payload))
        return runs / run_id

    folder("old", alpaca_dataset={"path": str(runs / "old" / "alpaca.parquet")})
    folder("pinned", alpaca_dataset={"path": str(runs / "pinned" / "alpaca.parquet")})
    folder("latest", alpaca_dataset={"path": str(runs / "latest" / "alpaca.parquet")})
    folder("training", alpaca_dataset={"path": str(runs / "pinned" / "alpaca.parquet")})  # live, read an earlier run's
    folder("other_instance_young")
    stale = folder("other_instance_old")
    os.utime(stale, (time.time() - UNKNOWN_RUN_GRACE_S - 60,) * 2)
    instance = FakeInstance(
        {"old": True, "pinned": True, "latest": True, "training": False}, {"alpaca_dataset": "latest"}
    )
    removed = prune_run_data(instance, runs, log=lambda m: None)
    assert removed == ["old", "other_instance_old"]
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "other_instance_young", "pinned", "training"]
    instance.runs["training"] = True  # once it ends, what it pinned goes too
    assert prune_run_data(instance, runs, log=lambda m: None) == ["pinned", "training"]


def test_an_upstream_from_an_earlier_run_is_pinned_for_the_whole_run(tmp_path):
    """A run that does not build ``up`` reads its latest materialization; if another run
    materializes ``up`` again while this run is between two steps, the later step still reads the
    one the first step read (through the real StageIOManager)."""
    from dagster import AssetIn, DagsterInstance, asset, materialize

    from resources import StageIOManager

    root = DataRoot(path=str(tmp_path / "data"))
    resources = {"io_manager": StageIOManager(data_root=root)}
    instance = DagsterInstance.ephemeral()
    version = {"n": 1}

    @asset
    def up() -> dict:
        return {"version": version["n"]}

    up_def = up

    @asset
    def first(up: dict) -> dict:
        version["n"] = 2  # meanwhile another run builds up again
        assert materialize([up_def], resources=resources, instance=instance).success
        return {"saw": up["version"]}

    @asset(ins={"up": AssetIn("up"), "first": AssetIn("first")})
    def second(up: dict, first: dict) -> dict:
        return {"saw": up["version"], "first_saw": first["saw"]}

    assert materialize([up], resources=resources, instance=instance).success
    result = materialize([up, first, second], selection=["first", "second"], resources=resources, instance=instance)
    assert result.success
    assert result.output_for_node("second") == {"saw": 1, "first_saw": 1}
    assert json.loads((root.stages_dir / "up.json").read_text()) == {"version": 2}  # the latest is the other run's
    # a run that starts now reads the new one
    later = materialize([up, first, second], selection=["second"], resources=resources, instance=instance)
    assert later.output_for_node("second")["saw"] == 2


def test_a_run_is_tagged_with_its_host_when_its_first_step_starts(tmp_path):
    """On a shared instance recovery judges a run by its host tag: set before any asset's code
    runs, so a run that dies in its first step (a reboot during the base model's conversion) is
    judged too."""
    import socket

    from dagster import DagsterInstance, asset, materialize

    from pipeline.core.stores import RUN_HOST_TAG

    seen = {}

    @asset
    def first_step(context, data_root: DataRoot) -> None:
        seen["tags"] = dict(context.instance.get_run_by_id(context.run_id).tags)
        raise RuntimeError("died in its first step")

    instance = DagsterInstance.ephemeral()
    result = materialize(
        [first_step], resources={"data_root": DataRoot(path=str(tmp_path))}, instance=instance, raise_on_error=False
    )
    assert not result.success
    assert seen["tags"][RUN_HOST_TAG] == socket.gethostname()
