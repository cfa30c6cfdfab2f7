"""``python -m pipeline.ask``: adapters switched on one base give the logits each gives alone; names
that name nothing get an error that lists what exists; a question is answered end to end."""

import json

import pandas as pd
import pytest
import torch

from conftest import demo_records, mlflow_store
from pipeline.ask import AskError, Models, main, resolve
from pipeline.stages.lora_adapter import TrainSpec, train
from pipeline.stages.tokenized_dataset import tokenize_dataset
from resources.data_root import DataRoot


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """A data root holding the base model's stage record and three trainings: two LoRA adapters
    (different learning rates and seeds) and one IA3 adapter."""
    from transformers import AutoTokenizer

    data = tmp_path_factory.mktemp("askdata")
    dr = DataRoot(path=str(data))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    df = pd.DataFrame(demo_records(12))
    df.insert(0, "record_id", [f"r{i}" for i in range(len(df))])
    df["split"] = ["eval" if i % 4 == 0 else "train" for i in range(len(df))]
    ds = tokenize_dataset(
        df,
        tok,
        data_fingerprint="a",
        tokenizer_fingerprint="a",
        out_root=dr.tokenized_dir,
        max_seq_len=256,
        system_prompt="你是助手。",
    )
    dr.stages_dir.mkdir(parents=True)
    (dr.stages_dir / "base_model.json").write_text(json.dumps({"path": str(tiny_model_dir)}))
    (dr.stages_dir / "tokenized_dataset.json").write_text(json.dumps({"path": ds.path}))
    for name, kw in {
        "aaaa1111aaaa1111": dict(learning_rate=5e-3, seed=1),
        "bbbb2222bbbb2222": dict(learning_rate=1e-2, seed=2),
        "cccc3333cccc3333": dict(learning_rate=3e-2, method="ia3"),
    }.items():
        folder = dr.models_dir / "adapters" / name
        train(
            TrainSpec(
                base_model_path=str(tiny_model_dir),
                tokenized_path=ds.path,
                output_dir=str(folder),
                checkpoint_dir=str(data / "ckpt" / name),
                max_steps=4,
                r=8,
                lora_alpha=16,
                precision="fp32",
                compile=False,
                log_every=4,
                eval_every=100,
                save_every=100,
                **kw,
            )
        )
    return dr


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_switching_adapters_on_one_base_gives_each_ones_own_logits(root, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from pipeline.stages.lora_adapter.inference import load_trained

    ids = torch.tensor([tokenizer("病例：咳嗽发热三天，咽喉肿痛。")["input_ids"]])
    targets = [resolve(n, root, "sqlite:///unused.db") for n in ("base", "aaaa", "bbbb2222bbbb2222", "cccc", "aaaa")]
    models = Models()
    for t in targets:
        models.add(t)
    assert len(models.bases) == 1 and len(models.apart) == 1  # one base; the IA3 adapter, another kind, apart
    seen = {}
    for t in targets:  # base, a, b, ia3, then a again: switching back restores a exactly
        with models.use(t) as model:
            seen.setdefault(t.path, []).append(logits(model, ids))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert torch.allclose(seen[str(tiny_model_dir)][0], logits(plain, ids), atol=1e-6)
    for t in targets[1:4]:
        alone, _, _ = load_trained(str(tiny_model_dir), t.path)
        for got in seen[t.path]:
            assert torch.allclose(got, logits(alone, ids), atol=1e-6), t.name
    a, b = seen[targets[1].path][0], seen[targets[2].path][0]
    assert not torch.allclose(a, b, atol=1e-4)  # two different adapters


def test_names_that_name_nothing_say_what_there_is(root, tmp_path):
    uri = mlflow_store(tmp_path / "mlflow.db")
    with pytest.raises(
        AskError,
        match=r"'dddd' is no adapter id; adapters in .*: (?=.*aaaa1111aaaa1111 \(lora\))(?=.*cccc3333cccc3333 \(ia3\))",
    ):
        resolve("dddd", root, uri)
    with pytest.raises(AskError, match=r"registered model 'medtune' has no alias 'champion' .*nothing registered yet"):
        resolve("champion", root, uri)
    with pytest.raises(AskError, match=r"has no version '7'"):
        resolve("models:/medtune/7", root, uri)
    with pytest.raises(AskError, match=r"unknown model 'my model!'.*available: .*aaaa1111aaaa1111"):
        resolve("my model!", root, uri)
    with pytest.raises(AskError, match="no merged model yet"):
        resolve("merged", root, uri)
    empty = DataRoot(path=str(tmp_path / "empty"))
    with pytest.raises(AskError, match="no base model materialized yet"):
        resolve("base", empty, uri)


def test_a_registered_alias_names_its_adapter(root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("medtune")
    run = client.create_run(client.create_experiment("x"))
    v = client.create_model_version(
        "medtune", "runs:/x/y", run_id=run.info.run_id, tags={"medtune.adapter_id": "bbbb2222bbbb2222"}
    )
    client.set_registered_model_alias("medtune", "champion", v.version)
    for name in ("champion", "medtune@champion", "models:/medtune@champion", f"models:/medtune/{v.version}"):
        assert resolve(name, root, uri).path.endswith("bbbb2222bbbb2222"), name
    with pytest.raises(AskError, match=rf"no alias 'staging'.*version {v.version} \(champion\)"):
        resolve("medtune@staging", root, uri)


def test_ask_answers_from_the_command_line_and_stdin(root, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    rc = main(
        [
            "头痛，失眠，用什么中成药？",
            "--data-dir",
            str(root.root),
            "--model",
            "base",
            "--model",
            "aaaa",
            "--max-new-tokens",
            "6",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "=== base" in out and "=== aaaa (aaaa1111aaaa1111, lora)" in out
    assert any(line.startswith("base ") and " | aaaa" in line for line in out.splitlines())  # the side-by-side table
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("咳嗽？"))
    assert main(["--data-dir", str(root.root), "--model", "cccc", "--no-stream", "--max-new-tokens", "4"]) == 0
    rc = main(["问题", "--data-dir", str(root.root), "--model", "zzzz"])
    assert rc == 2 and "unknown model 'zzzz'" in capsys.readouterr().err
    # nothing registered: the default (base and champion) falls back to base and the newest adapter
    assert main(["问题", "--data-dir", str(root.root), "--max-new-tokens", "2", "--no-stream"]) == 0
    assert "=== " not in capsys.readouterr().out  # --no-stream: only the table


def test_an_unreachable_store_is_named_without_its_password_and_quickly(tmp_path, monkeypatch, capsys):
    """make ask over a PostgreSQL store that does not answer: one line that names it with the
    password masked, in seconds (MLflow's own client retries such a database for minutes)."""
    import time

    from pipeline.ask import main

    password = "Secr3t-pw-42"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql://medtune:{password}@127.0.0.1:1/medtune_mlflow")
    started = time.monotonic()
    assert main(["咳嗽，用什么中成药？", "--model", "champion", "--data-dir", str(tmp_path)]) == 2
    said = capsys.readouterr()
    assert time.monotonic() - started < 30
    assert (
        "'champion': MLflow store postgresql://medtune:***@127.0.0.1:1/medtune_mlflow" in said.err
        and "unreachable" in said.err
    )
    assert password not in said.out + said.err
