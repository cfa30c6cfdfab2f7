"""Benchmark: several adapters over one base in one server (``make serve ADAPTERS=...``,
``pipeline/ops/serve_adapters.py``) against one merged model per server, side by side in one run.

    python bench/serve_adapters.py [--model bundled:SmolLM2-135M-Instruct] [--adapters 3] [--r 64]

Three LoRA adapters of the training's default shape (rank 64 on every linear layer, random weights:
what is measured is memory and switching, not quality) are written to a temporary folder. Then,
each in a process of its own so that its memory is its own:

- ``one``: one adapter merged into the base (what ``make serve`` of a merged model holds), loaded
  and answering one question: its resident memory (RSS);
- ``several``: the base once and every adapter on it, each answering: RSS, the time to switch
  adapters (``set_adapter``) and an answer's time right after a switch against one on the same
  adapter, and every adapter's greedy answers to the demo's questions;
- ``merged``: each adapter merged into its own copy of the base, answering the same questions.

Printed: both RSS figures and their ratio (goal: under 1.2), whether every adapter's answers equal
its merged model's, the switch times. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUESTIONS = 4
MAX_TOKENS = 32


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


def questions() -> list[str]:
    from pipeline.stages.alpaca_dataset import build_alpaca
    from pipeline.stages.deduplicated_records import deduplicate
    from pipeline.stages.raw_records import ingest
    from pipeline.stages.validated_records import validate_records

    alpaca = build_alpaca(deduplicate(validate_records(ingest(ROOT / "data" / "raw").kept).kept).kept)
    rows = alpaca.sort_values("split").head(QUESTIONS)
    return [f"{i}\n{x}" if x else i for i, x in zip(rows["instruction"], rows["input"])]


def ask(chat, question: str, max_tokens: int = MAX_TOKENS) -> str:
    request = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    return chat.predict(None, request)["choices"][0]["message"]["content"]


def chat_over(model, tokenizer, name: str):
    from pipeline.stages.registered_model.serving import MedTuneChatModel
    from pipeline.stages.tokenized_dataset import DEFAULT_SYSTEM_PROMPT, end_of_turn_id

    chat = MedTuneChatModel()
    chat.system_prompt, chat.max_new_tokens, chat.name, chat.model, chat.tokenizer = (
        DEFAULT_SYSTEM_PROMPT,
        MAX_TOKENS,
        name,
        model,
        tokenizer,
    )
    chat.generation_config = model.generation_config
    chat.generation_config.eos_token_id = end_of_turn_id(tokenizer)
    return chat


def merged(base: str, adapter: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    return chat_over(model, tokenizer, Path(adapter).name)


def child(kind: str, base: str, adapters: list[str]) -> dict:
    import torch

    torch.set_num_threads(torch.get_num_threads())
    asked = questions()
    if kind == "one":
        chat = merged(base, adapters[0])
        ask(chat, asked[0], 8)
        return {"rss_mb": round(rss_mb(), 1)}
    if kind == "merged":
        return {"answers": {Path(a).name: [ask(merged(base, a), q) for q in asked] for a in adapters}}
    from pipeline.ops.serve_adapters import from_folder, load_adapters

    served = load_adapters([from_folder(Path(a), Path(a).name) for a in adapters], MAX_TOKENS)
    answers = {s.name: [ask(s.python_model, q) for q in asked] for s in served}
    peft_model = served[0].python_model.model
    switches = []
    for i in range(20):
        t0 = time.perf_counter()
        peft_model.set_adapter(served[i % len(served)].python_model.adapter)
        switches.append(time.perf_counter() - t0)
    same, switched = [], []
    for i in range(6):
        t0 = time.perf_counter()
        ask(served[0].python_model, asked[0], 1)
        same.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ask(served[1 + i % (len(served) - 1)].python_model, asked[0], 1)
        switched.append(time.perf_counter() - t0)
        ask(served[0].python_model, asked[0], 1)  # back to the first
    return {
        "rss_mb": round(rss_mb(), 1),
        "answers": answers,
        "set_adapter_ms": round(statistics.median(switches) * 1e3, 3),
        "one_token_same_adapter_ms": round(statistics.median(same) * 1e3, 1),
        "one_token_after_switch_ms": round(statistics.median(switched) * 1e3, 1),
    }


def make_adapters(base: str, folder: Path, n: int, r: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)  # an update of a trained adapter's size, not a random model
        peft_model.save_pretrained(folder / f"adapter-{i}")
        out.append(str(folder / f"adapter-{i}"))
    return out


def run_child(kind: str, base: str, adapters: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--base", base, *sum((["--adapter", a] for a in adapters), [])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--child", choices=["one", "several", "merged"])
    ap.add_argument("--base")
    ap.add_argument("--adapter", action="append", default=[])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.base, args.adapter), ensure_ascii=False))
        return
    from pipeline.stages.base_model import resolve_base_model
    from resources.data_root import DataRoot, default_data_dir

    base = resolve_base_model(args.model, DataRoot(path=default_data_dir()).models_dir).path
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base, Path(tmp), args.adapters, args.r)
        size = sum(f.stat().st_size for a in adapters for f in Path(a).glob("*.safetensors")) / len(adapters) / 2**20
        one, several, merged_answers = (run_child(k, base, adapters) for k in ("one", "several", "merged"))
    identical = {name: several["answers"][name] == merged_answers["answers"][name] for name in several["answers"]}
    ratio = several["rss_mb"] / one["rss_mb"]
    print(f"{args.model}, {args.adapters} LoRA adapters of rank {args.r} on every linear layer ({size:.1f} MB each)")
    print(f"RSS: one merged model {one['rss_mb']:.0f} MB; base + {args.adapters} adapters {several['rss_mb']:.0f} MB")
    print(f"  ratio {ratio:.3f} (goal: under 1.2)")
    print(f"answers equal to each adapter's merged model ({QUESTIONS} questions, greedy, {MAX_TOKENS} tokens):")
    print(f"  {identical}")
    print(
        f"switch: set_adapter {several['set_adapter_ms']} ms (median); a one-token answer "
        f"{several['one_token_same_adapter_ms']} ms on the same adapter, {several['one_token_after_switch_ms']} ms "
        "right after a switch"
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "model": args.model,
        "adapters": args.adapters,
        "rank": args.r,
        "adapter_mb": round(size, 1),
        "rss_one_merged_mb": one["rss_mb"],
        "rss_base_and_adapters_mb": several["rss_mb"],
        "rss_ratio": round(ratio, 3),
        "answers_identical": identical,
        "set_adapter_ms": several["set_adapter_ms"],
        "one_token_same_adapter_ms": several["one_token_same_adapter_ms"],
        "one_token_after_switch_ms": several["one_token_after_switch_ms"],
        "children_peak_rss_mb": round(peak, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
