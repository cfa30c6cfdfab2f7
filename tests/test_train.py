"""LoRA training with the tiny model: the loop itself, exact resume after a kill, two processes,
determinism and the cache key. (The engine's pieces, packing, chunked loss and precision, are in
test_training_engine.py.)"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import demo_records
from pipeline.stages.lora_adapter import TrainSpec, train
from pipeline.stages.lora_adapter.batching import collate_padded, plan_epoch
from pipeline.stages.tokenized_dataset import tokenize_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenized(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = demo_records(20)
    df = pd.DataFrame(rows)
    df.insert(0, "record_id", [f"r{i}" for i in range(len(df))])
    df["split"] = ["eval" if i % 5 == 0 else "train" for i in range(len(df))]  # 16 train, 4 eval
    ds = tokenize_dataset(
        df,
        tok,
        data_fingerprint="t",
        tokenizer_fingerprint="t",
        out_root=tmp_path_factory.mktemp("tok"),
        max_seq_len=256,
        system_prompt="你是助手。",
    )
    return ds.path


def spec_for(tmp_path, tiny_model_dir, tokenized, **kw):
    base = dict(
        base_model_path=str(tiny_model_dir),
        tokenized_path=tokenized,
        output_dir=str(tmp_path / "adapter"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        max_steps=8,
        pack_tokens=512,
        learning_rate=5e-3,
        eval_every=4,
        save_every=2,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        precision="fp32",
        compile=False,
        log_every=1,
    )
    base.update(kw)
    return TrainSpec(**base)


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def test_collate_padded_pads_to_a_multiple_of_8_and_masks_padding():
    batch = collate_padded([([1, 2, 3], [-100, 2, 3]), ([4] * 10, [-100] * 5 + [4] * 5)], pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"][0, 3:].eq(-100).all() and batch["attention_mask"][0].sum() == 3
    assert batch["labels"][1, :5].eq(-100).all() and batch["labels"][1, 5:10].eq(4).all()


def test_the_epoch_plan_packs_to_the_budget_is_seeded_and_uses_every_row_once():
    lengths = [300, 120, 500, 80, 260, 410, 90, 700, 30, 220]
    plan = plan_epoch(lengths, seed=1, epoch=0, packing=True, pack_tokens=600, batch_size=1)
    assert plan == plan_epoch(lengths, seed=1, epoch=0, packing=True, pack_tokens=600, batch_size=1)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:  # a step holds rows up to the budget; a row longer than the budget goes alone
        assert sum(lengths[i] for i in b) <= 600 or len(b) == 1
    assert [len(b) for b in plan] != [1] * len(lengths)
    assert plan != plan_epoch(lengths, seed=1, epoch=1, packing=True, pack_tokens=600, batch_size=1)
    rows = plan_epoch(lengths, seed=1, epoch=0, packing=False, pack_tokens=600, batch_size=3)
    assert [len(b) for b in rows] == [3, 3, 3, 1] and sorted(i for b in rows for i in b) == list(range(10))


def test_tiny_model_learns_and_the_adapter_changes_the_model(tmp_path, tiny_model_dir, tokenized):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(spec_for(tmp_path, tiny_model_dir, tokenized, max_steps=12))
    assert result["steps"] == 12 and result["processes"] == 1
    assert result["final_eval_loss"] < result["first_eval_loss"] - 0.05
    folder = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "medtune_training.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert (
        "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
        or (folder / "chat_template.jinja").exists()
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 67, 19572, 2, 198]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, folder)
    after = tuned(ids).logits
    assert not torch.allclose(before, after)
    metrics = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(metrics[1])


def test_same_seed_gives_the_same_adapter(tmp_path, tiny_model_dir, tokenized):
    a = train(spec_for(tmp_path / "a", tiny_model_dir, tokenized, max_steps=4, lora_dropout=0.05))
    b = train(spec_for(tmp_path / "b", tiny_model_dir, tokenized, max_steps=4, lora_dropout=0.05))
    ta, tb = adapter_tensors(a["adapter_path"]), adapter_tensors(b["adapter_path"])
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    c = train(spec_for(tmp_path / "c", tiny_model_dir, tokenized, max_steps=4, lora_dropout=0.05, seed=7))
    tc = adapter_tensors(c["adapter_path"])
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


KILLED_CHILD = ROOT / "tests" / "fixtures" / "killed_child.py"


def run_child(
    spec: TrainSpec, path: Path, launcher: list[str] | None = None, kill_at: int | None = None
) -> subprocess.CompletedProcess:
    """Run the training entry point (SIGKILLed as step ``kill_at`` ends, if given); on a timeout the
    whole process group (launcher and workers) is killed."""
    spec.dump(path)
    entry = ["-m", "pipeline.stages.lora_adapter"] if kill_at is None else [str(KILLED_CHILD), str(kill_at)]
    cmd = (launcher or [sys.executable]) + [*entry, "--spec", str(path)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"training timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_killed_training_resumes_exactly_where_it_stopped(tmp_path, tiny_model_dir, tokenized):
    """Packed steps and dropout on: killed after step 7 (checkpoints at 2, 4 and 6; the two newest
    kept, ``save_total_limit`` 2); step 6's weights then cut short (what a power cut before the data
    reached the disk leaves): the resume skips it with a warning, starts from step 4, and the
    adapter is bit for bit the one an uninterrupted training gives."""
    settings = dict(max_steps=8, save_every=2, lora_dropout=0.1, pack_tokens=300)
    whole = train(spec_for(tmp_path / "whole", tiny_model_dir, tokenized, **settings))
    assert whole["steps"] == 8
    spec = spec_for(tmp_path, tiny_model_dir, tokenized, **settings)
    killed = run_child(spec, tmp_path / "spec.json", kill_at=7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "adapter").exists()  # nothing half-written where the next step reads
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if "step-" in p.name) == ["step-4", "step-6"]
    assert "checkpoint saved at step 6 (removed step-2)" in killed.stdout + killed.stderr
    weights = tmp_path / "ckpt" / "step-6" / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    resumed = run_child(spec, tmp_path / "spec.json")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        "step-6 is damaged (adapter_model.safetensors holds" in resumed.stdout
        and "skipped for the one before" in resumed.stdout
    )
    assert "resuming from checkpoint" in resumed.stdout and "step-4" in resumed.stdout
    result = json.loads(resumed.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["steps"] == 8 and result["resumed_from"] == "step-4"
    a, b = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tmp_path / "whole" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_cpu_processes_train_one_adapter(tmp_path, tiny_model_dir, tokenized):
    """DDP on the gloo backend: torchrun starts two processes on this CPU (accelerate launch
    starts only one without GPUs; see the README's scaling section)."""
    spec = spec_for(tmp_path, tiny_model_dir, tokenized, max_steps=4, save_every=100)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = run_child(spec, tmp_path / "spec.json", [torchrun, "--standalone", "--nproc_per_node", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["processes"] == 2 and result["steps"] == 4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == result["trainable_parameters"]


@pytest.mark.slow
def test_two_processes_killed_and_resumed_train_what_an_uninterrupted_run_trains(tmp_path, tiny_model_dir, tokenized):
    """DDP on gloo, two CPU processes, dropout on: each process draws its own dropout masks (its rows
    differ), so each process's random state is saved and restored as its own. Killed after step 5
    (checkpoints at 2 and 4), resumed from step 4: the adapter equals the uninterrupted two-process
    run's bit for bit."""
    from pipeline.stages.lora_adapter.checkpoint import complete_checkpoints

    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    settings = dict(max_steps=6, save_every=2, lora_dropout=0.1, pack_tokens=300, eval_every=100)
    whole = run_child(
        spec_for(tmp_path / "whole", tiny_model_dir, tokenized, **settings), tmp_path / "whole.json", torchrun
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    spec = spec_for(tmp_path, tiny_model_dir, tokenized, **settings)
    killed = run_child(spec, tmp_path / "spec.json", torchrun, kill_at=5)
    assert killed.returncode != 0 and not (tmp_path / "adapter").exists()
    assert [p.name for p in complete_checkpoints(tmp_path / "ckpt")] == ["step-2", "step-4"]
    rng = torch.load(tmp_path / "ckpt" / "step-4" / "rng.pt", weights_only=True)
    assert rng["processes"] == 2 and not torch.equal(rng["states"][0]["torch"], rng["states"][1]["torch"])
    resumed = run_child(spec, tmp_path / "spec.json", torchrun)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["processes"] == 2 and result["resumed_from"] == "step-4" and result["steps"] == 6
    a, b = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tmp_path / "whole" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_id_covers_every_training_setting():
    from pipeline.stages.lora_adapter import TRAINING_KEYS, adapter_id

    spec = TrainSpec(base_model_path="", tokenized_path="", output_dir="", checkpoint_dir="").model_dump()
    base = adapter_id("data", "weights", spec, 1)
    assert base == adapter_id("data", "weights", {**spec, "log_every": 99, "output_dir": "/elsewhere"}, 1)
    for key in TRAINING_KEYS:
        value = spec[key]
        changed = (
            (not value)
            if isinstance(value, bool) or value is None
            else (value + 1 if isinstance(value, (int, float)) else f"{value}x")
        )
        assert adapter_id("data", "weights", {**spec, key: changed}, 1) != base, key
    assert adapter_id("data2", "weights", spec, 1) != base and adapter_id("data", "w2", spec, 1) != base
    assert adapter_id("data", "weights", spec, 2) != base


def test_a_damaged_checkpoint_is_skipped_and_rotation_keeps_two(tmp_path):
    from pipeline.stages.lora_adapter.checkpoint import (
        complete_checkpoints,
        latest_checkpoint,
        rotate_checkpoints,
        write_manifest,
    )

    def checkpoint(step, manifest=True):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(os.urandom(64))
        (folder / "optimizer.pt").write_bytes(os.urandom(32))
        if manifest:
            write_manifest(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        return folder

    old, older, newest = checkpoint(2, manifest=False), checkpoint(4), checkpoint(6)
    said = []
    assert latest_checkpoint(tmp_path, said.append) == newest and said == []
    (newest / "optimizer.pt").write_bytes(b"x" * 32)  # same size, other bytes
    assert latest_checkpoint(tmp_path, said.append) == older and "optimizer.pt changed" in said[-1]
    os.truncate(older / "adapter_model.safetensors", 0)
    assert latest_checkpoint(tmp_path, said.append) == old and "holds 0 bytes, not 64" in said[-1]
    os.truncate(old / "optimizer.pt", 0)  # written before manifests: an empty file is the sign
    assert latest_checkpoint(tmp_path, said.append) is None and "optimizer.pt empty" in said[-1]
    assert rotate_checkpoints(tmp_path, keep=1) == ["step-2"]  # never fewer than two
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-4", "step-6"]
