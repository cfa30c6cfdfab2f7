"""Benchmark: ``make serve`` under load. Sixteen clients on loopback for a minute, with a mix of good
answers, oversized bodies, ``max_tokens`` beyond the server's limit and malformed requests. Before
the load, the official ``openai`` client on ``/v1``: a whole answer's time and a streamed answer's
time to its first token.

    python bench/serve_load.py [--model bundled:SmolLM2-135M-Instruct] [--clients 16] [--seconds 60]

Starts ``python -m pipeline.ops.serve`` (its own limits: pipeline/ops/serve_limits.py) on a free
port over ``--model`` (a base model reference, a model folder, or anything ``make serve`` takes),
each client sends one request after another, drawn from the mix with a fixed seed. Printed: requests
per status code, p50/p95/max latency per status, the server's RSS after one answer and at the end;
goals: no status but 200, 400, 413 and 503, no answer slower than the request timeout, RSS growth
under 10%. Last line, JSON: the same figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALLOWED = {200, 400, 413, 503}
QUESTIONS = [
    "咳嗽，咽喉肿痛，用什么中成药？",
    "头痛发热，鼻塞流涕，适合什么中成药？",
    "胃脘胀痛，嗳气反酸，用什么药？",
    "失眠多梦，心悸健忘，吃什么中成药？",
]


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.machine(),
    )
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in info]
    return f"{name}, {os.cpu_count()} cores, {' '.join(flags) or 'no bf16 matrix flags'}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request_mix(rng: random.Random, max_tokens: int, max_body: int) -> tuple[str, bytes]:
    """(kind, body): most good, the rest each a way to be refused."""
    kind = rng.choices(
        ["good", "list", "oversized", "too_many_tokens", "malformed", "bad_json"], [50, 10, 10, 10, 10, 10]
    )[0]
    question = rng.choice(QUESTIONS)
    body = {
        "good": {"messages": [{"role": "user", "content": question}], "max_tokens": rng.choice([8, 16, 32])},
        "list": {"inputs": [question, rng.choice(QUESTIONS)], "params": {"max_tokens": 8}},
        "oversized": {"inputs": [question * (max_body // len(question.encode()) + 1)]},
        "too_many_tokens": {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens + 1},
        "malformed": {"messages": [{"role": "robot", "content": question}]},
    }.get(kind)
    return kind, (b'{"messages": [' if body is None else json.dumps(body, ensure_ascii=False).encode())


def client(port: int, seed: int, until: float, limits: dict, results: list) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        kind, body = request_mix(rng, limits["max_tokens"], limits["max_body"])
        start = time.monotonic()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=limits["timeout_s"] + 30)
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            status, retry = resp.status, resp.getheader("Retry-After")
            conn.close()
        except OSError as e:
            status, retry = f"error: {type(e).__name__}", None
        results.append({"kind": kind, "status": status, "seconds": time.monotonic() - start})
        if retry:
            time.sleep(min(float(retry), 2.0) * rng.random())  # a polite client, with jitter


def openai_client_times(port: int, max_tokens: int, repeats: int = 3) -> dict:
    """The official ``openai`` client on ``/v1`` before the load: a whole answer's time, and a streamed
    answer's time to its first content and to its end (medians of ``repeats``, greedy)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    name = client.models.list().data[0].id
    ask = {"model": name, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": max_tokens}
    whole, first, streamed, tokens = [], [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        answer = client.chat.completions.create(**ask)
        whole.append(time.perf_counter() - t0)
        tokens = answer.usage.completion_tokens
        t0, seen = time.perf_counter(), None
        for chunk in client.chat.completions.create(**ask, stream=True):
            if seen is None and chunk.choices and chunk.choices[0].delta.content:
                seen = time.perf_counter() - t0
        first.append(seen if seen is not None else float("nan"))
        streamed.append(time.perf_counter() - t0)
    return {
        "openai_answer_s": round(statistics.median(whole), 3),
        "openai_answer_tokens": tokens,
        "openai_stream_first_token_s": round(statistics.median(first), 3),
        "openai_stream_total_s": round(statistics.median(streamed), 3),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled:SmolLM2-135M-Instruct")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64, help="the server's --max-tokens")
    ap.add_argument("--max-body", type=int, default=1 << 16, help="the server's --max-body")
    args = ap.parse_args()

    from resources.data_root import DataRoot, default_data_dir

    model = args.model
    if model.startswith("bundled:"):  # a base model: served as a model folder
        from pipeline.stages.base_model import resolve_base_model

        model = str(resolve_base_model(model, DataRoot(path=default_data_dir()).models_dir).path)
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="serve-load-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "pipeline.ops.serve", "--model", model, "--port", str(port)]
    cmd += ["--max-tokens", str(args.max_tokens), "--max-body", str(args.max_body)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while b"Uvicorn running" not in log.read_bytes():
            if server.poll() is not None or time.monotonic() > deadline:
                print(log.read_text()[-4000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        said = log.read_text()
        timeout_s = float(said.split("request timeout ")[1].split(" s")[0]) if "request timeout " in said else 60.0
        limits = {"timeout_s": timeout_s, "max_tokens": args.max_tokens, "max_body": args.max_body}
        warm = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 16}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        conn.request(
            "POST", "/invocations", body=json.dumps(warm).encode(), headers={"Content-Type": "application/json"}
        )
        assert conn.getresponse().status == 200
        conn.close()
        sdk = openai_client_times(port, args.max_tokens)
        rss_start = rss_mb(server.pid)
        results: list[dict] = []
        until = time.monotonic() + args.seconds
        threads = [threading.Thread(target=client, args=(port, i, until, limits, results)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    by_status: dict[str, list[float]] = {}
    for r in results:
        by_status.setdefault(str(r["status"]), []).append(r["seconds"])
    latencies = [r["seconds"] for r in results]
    figures = {
        "machine": machine(),
        "model": args.model,
        "clients": args.clients,
        "seconds": args.seconds,
        "request_timeout_s": timeout_s,
        "requests": len(results),
        "status_counts": {k: len(v) for k, v in sorted(by_status.items())},
        "latency_s": {
            k: {"p50": round(percentile(v, 50), 3), "p95": round(percentile(v, 95), 3), "max": round(max(v), 3)}
            for k, v in sorted(by_status.items())
        },
        "latency_all_s": {
            "p50": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "max": round(max(latencies), 3),
        },
        "rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1), "growth": round(rss_end / rss_start - 1, 4)},
        **sdk,
    }
    goals = {
        "only_200_400_413_503": set(by_status) <= {str(s) for s in ALLOWED},
        "no_answer_past_timeout": max(latencies) <= timeout_s + 1,
        "rss_growth_under_10pct": figures["rss_mb"]["growth"] < 0.10,
    }
    figures["goals"] = goals
    print(figures["machine"])
    print(
        f"openai client, before the load: an answer of {sdk['openai_answer_tokens']} tokens in "
        f"{sdk['openai_answer_s']} s; streamed: first content after {sdk['openai_stream_first_token_s']} s, "
        f"done after {sdk['openai_stream_total_s']} s"
    )
    print(
        f"{len(results)} requests from {args.clients} clients in {args.seconds:.0f} s; request timeout "
        f"{timeout_s:.0f} s"
    )
    for status, values in sorted(by_status.items()):
        lat = figures["latency_s"][status]
        print(
            f"  {status}: {len(values):5d} requests, latency p50 {lat['p50']:.3f} s, p95 {lat['p95']:.3f} s, max "
            f"{lat['max']:.3f} s"
        )
    print(
        f"  server RSS {rss_start:.0f} MB after one answer, {rss_end:.0f} MB at the end "
        f"({figures['rss_mb']['growth']:+.1%})"
    )
    print("  goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in goals.items()))
    print(json.dumps(figures))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
