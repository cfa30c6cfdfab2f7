"""Benchmark: the streamed merge (``pipeline.stages.merged_model.merge_streamed`` and its layer-wise
proof ``verify_layers``, the stage's own code) on a base of a real model's shape, against the disk.

    python bench/merge_throughput.py [--shape qwen2.5-7b|qwen2.5-1.5b] [--rank 16] [--dtype bfloat16]

Writes into a temporary folder a randomly initialised base of the named shape in bf16 (tensor by
tensor: never the whole model in memory; not counted) and a LoRA adapter of rank ``--rank`` on every
linear layer of every block, then drops the base's pages from the page cache and runs the merge
and its proof in a child process. Also measures, in the same run, the disk's sequential write
(with fsync) and read (page cache dropped) throughput on a 2 GB file in the same folder.

Figures (last line, JSON): ``base_gb``; ``peak_rss_mb`` (the child's ``VmHWM``: the merge and proof
alone); ``seconds`` (merge plus proof) and ``merge_seconds`` / ``verify_seconds``; bytes read and
written; ``io_bound_seconds`` = bytes read ÷ read throughput + bytes written ÷ write throughput;
``seconds / io_bound_seconds``; and the proof's result. Goals: ``peak_rss_mb`` ≤ 3072 for the 7B
shape and ``seconds`` ≤ 3 × ``io_bound_seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def drop_cache(path: Path) -> None:
    """Evict a written file's pages from the page cache (so the merge reads from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_throughput(folder: Path, size: int = 2 * 2**30) -> tuple[float, float]:
    """(write bytes/s with fsync, read bytes/s from disk) of one sequential file."""
    path = folder / "throughput.bin"
    block = os.urandom(16 * 2**20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.perf_counter() - t)
    drop_cache(path)
    buffer = bytearray(16 * 2**20)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    read = size / (time.perf_counter() - t)
    path.unlink()
    return write, read


def write_base(folder: Path, shape: str) -> float:
    """A random bf16 base of ``shape``: config and safetensors shards, written a tensor at a time."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.core.safetensors_stream import FolderWriter

    config = AutoConfig.for_model("qwen2", **SHAPES[shape])
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = [
        (n, t.dtype, list(t.shape))
        for n, t in skeleton.state_dict().items()
        if not (config.tie_word_embeddings and n == "lm_head.weight")
    ]
    writer = FolderWriter(folder, tensors, max_shard_size="4GB")
    g = torch.Generator().manual_seed(0)
    for name, dtype, dims in tensors:
        t = (
            torch.ones(dims, dtype=dtype)
            if "norm" in name
            else torch.empty(dims, dtype=dtype).uniform_(-0.05, 0.05, generator=g)
        )
        writer.write(name, t)
    writer.close()
    for p in folder.glob("*.safetensors"):
        drop_cache(p)
    return writer.total_size / 1e9


def write_adapter(folder: Path, shape: str, rank: int) -> int:
    """A LoRA adapter of rank ``rank`` on every linear layer of every block (random A and B)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    s = SHAPES[shape]
    hd = s["hidden_size"] // s["num_attention_heads"]
    dims = {
        "q_proj": (s["hidden_size"], s["num_attention_heads"] * hd),
        "k_proj": (s["hidden_size"], s["num_key_value_heads"] * hd),
        "v_proj": (s["hidden_size"], s["num_key_value_heads"] * hd),
        "o_proj": (s["num_attention_heads"] * hd, s["hidden_size"]),
        "gate_proj": (s["hidden_size"], s["intermediate_size"]),
        "up_proj": (s["hidden_size"], s["intermediate_size"]),
        "down_proj": (s["intermediate_size"], s["hidden_size"]),
    }
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), task_type="CAUSAL_LM").save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    weights = {}
    for layer in range(s["num_hidden_layers"]):
        for name in TARGETS:
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            fan_in, fan_out = dims[name]
            weights[f"{key}.lora_A.weight"] = torch.randn((rank, fan_in), generator=g) / fan_in**0.5
            weights[f"{key}.lora_B.weight"] = torch.randn((fan_out, rank), generator=g) * 0.01
    save_file(weights, folder / "adapter_model.safetensors")
    return len(weights) // 2


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from pipeline.stages.merged_model import merge_streamed, verify_layers
t = time.perf_counter()
info, refs = merge_streamed({base!r}, {dest!r}, adapter_path={adapter!r}, dtype={dtype!r}, max_shard_size="4GB",
                            log=lambda m: print(m, file=sys.stderr, flush=True))
merge = time.perf_counter() - t
t = time.perf_counter()
proof = verify_layers({dest!r}, refs, {dtype!r}, info["linear_layers"])
verify = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
from pipeline.core.safetensors_stream import FolderReader
verify_bytes = sum(r.inputs.shape[1] * r.outputs.shape[1] for r in refs) * {elsize}
print(json.dumps({{"merge_seconds": merge, "verify_seconds": verify, "peak_rss_mb": hwm / 1024, "info": info,
                  "verify_bytes_read": verify_bytes, "proof": {{k: v for k, v in proof.items() if k != "failures"}},
                  "proof_failures": proof["failures"][:3]}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--dir", default=None, help="where the temporary files go (default: the system's temporary folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="medtune-merge-bench-") as tmp:
        tmp = Path(tmp)
        base, adapter, dest = tmp / "base", tmp / "adapter", tmp / "merged"
        for d in (base, adapter, dest):
            d.mkdir()
        write_bps, read_bps = disk_throughput(tmp)
        print(
            f"disk: write {write_bps / 1e6:.0f} MB/s (fsync), read {read_bps / 1e6:.0f} MB/s (page cache dropped)",
            flush=True,
        )
        t = time.perf_counter()
        base_gb = write_base(base, args.shape)
        layers = write_adapter(adapter, args.shape, args.rank)
        print(
            f"wrote a {args.shape} base ({base_gb:.2f} GB bf16) and a rank-{args.rank} adapter on {layers} layers "
            f"in {time.perf_counter() - t:.0f} s (not counted)",
            flush=True,
        )
        elsize = 4 if args.dtype == "float32" else 2
        code = CHILD.format(
            root=str(ROOT), base=str(base), adapter=str(adapter), dest=str(dest), dtype=args.dtype, elsize=elsize
        )
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        info = child["info"]
        read_bytes = info["bytes_read"] + child["verify_bytes_read"]
        written = info["bytes_written"]
        io_bound = read_bytes / read_bps + written / write_bps
        seconds = child["merge_seconds"] + child["verify_seconds"]
        print(
            f"merge {child['merge_seconds']:.1f} s + layer proof {child['verify_seconds']:.1f} s = {seconds:.1f} s "
            f"(child process {wall:.1f} s with start-up); read {read_bytes / 1e9:.2f} GB, wrote "
            f"{written / 1e9:.2f} GB: "
            f"{io_bound:.1f} s at the disk's speed; peak RSS {child['peak_rss_mb']:.0f} MB; proof passed: "
            f"{child['proof']['passed']}",
            flush=True,
        )
        print(
            json.dumps(
                {
                    "benchmark": "merge_throughput",
                    "shape": args.shape,
                    "rank": args.rank,
                    "dtype": args.dtype,
                    "base_gb": round(base_gb, 3),
                    "layers_merged": info["layers_merged"],
                    "peak_rss_mb": round(child["peak_rss_mb"], 1),
                    "goal_peak_rss_mb": 3072,
                    "seconds": round(seconds, 2),
                    "merge_seconds": round(child["merge_seconds"], 2),
                    "verify_seconds": round(child["verify_seconds"], 2),
                    "child_wall_seconds": round(wall, 2),
                    "bytes_read": read_bytes,
                    "bytes_written": written,
                    "disk_write_mb_s": round(write_bps / 1e6, 1),
                    "disk_read_mb_s": round(read_bps / 1e6, 1),
                    "io_bound_seconds": round(io_bound, 2),
                    "seconds_over_io_bound": round(seconds / io_bound, 2),
                    "goal_seconds_over_io_bound": 3.0,
                    "proof": child["proof"],
                    "proof_failures": child["proof_failures"],
                }
            )
        )


if __name__ == "__main__":
    main()
