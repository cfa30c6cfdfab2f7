"""Benchmark: raw JSON → ``alpaca_dataset`` through the functions the assets use, against a naive baseline.

    python bench/data_throughput.py [--rows 1000000] [--files 8] [--minified] [--naive-max-rows 1000000]

Generates N synthetic Chinese patent-medicine records (2% duplicates or whitespace / full-width
variants of earlier rows, 1% near duplicates: an earlier case re-posted with one character or
punctuation mark changed, 1% bad rows of several kinds) as JSON Lines and JSON array files
(``--minified``: every file a JSON array on a single line, as ``json.dump`` writes by default),
then times, each in its own child process and one after the other in this run:

* ``pipeline``: ``ingest_to`` → ``validate_to`` (Great Expectations, per chunk) →
  ``deduplicate_to`` → ``write_alpaca`` and ``write_rejected``, exactly what the assets call,
  with the stages' files between them (streamed: chunks of 100,000 rows, large files in blocks);
* ``naive``: ``json.load`` / ``json.loads`` per line plus a Python loop per row with the same
  checks (types, blank, lengths, control characters, invalid Unicode, NFKC + whitespace
  normalisation, SHA-256 ids, exact dedup, conflicts, near duplicates with one datasketch
  ``MinHash`` per row in an in-memory ``MinHashLSH``, hash split by near group), then the same
  Parquet write.

Both count rows read from the time the first file is opened to the time the last Parquet file is
written; imports are excluded and reported apart. Peak RSS: the resident memory of the child and
its worker processes together, sampled every 20 ms, or the child's own high-water mark (``VmHWM``;
``ru_maxrss`` would carry the parent's across ``exec``) where that is higher; each process's own
peak is printed too, and their sum (an upper bound: the workers' peaks come before the child's).
The baseline holds every row
in memory, so it is skipped above ``--naive-max-rows``. Prints a last line of JSON with ``rows``,
``pipeline_rows_per_s``, ``pipeline_peak_rss_mb`` and, when the baseline ran, its figures and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTRUCTIONS = [
    "使用中医知识正确回答适合这个病例的中成药。",
    "请根据症状推荐一种中成药。",
    "根据以下病例描述，给出合适的中成药建议。",
]
MEDS = [
    "板蓝根颗粒",
    "藿香正气水",
    "六味地黄丸",
    "连花清瘟胶囊",
    "感冒清热颗粒",
    "银翘解毒丸",
    "保和丸",
    "香砂养胃丸",
    "逍遥丸",
    "归脾丸",
    "天王补心丸",
    "复方丹参滴丸",
    "川贝枇杷膏",
    "急支糖浆",
    "黄连上清丸",
    "牛黄解毒片",
]
SYMPTOMS = [
    "咳嗽",
    "发热",
    "咽喉肿痛",
    "头痛",
    "腹胀",
    "失眠多梦",
    "腰膝酸软",
    "口干",
    "便秘",
    "恶心",
    "胸闷",
    "乏力",
    "盗汗",
    "耳鸣",
    "食欲不振",
    "月经不调",
    "心悸",
    "鼻塞流涕",
    "反酸",
    "眩晕",
]
FUNCS = [
    "清热解毒，凉血利咽。",
    "解表化湿，理气和中。",
    "滋阴补肾。",
    "疏肝健脾，养血调经。",
    "消食导滞，和胃。",
    "益气健脾，养血安神。",
]


def make_record(rng: random.Random, i: int) -> dict:
    med = rng.choice(MEDS)
    days = rng.randint(1, 30)
    symptoms = "，".join(rng.sample(SYMPTOMS, rng.randint(2, 5)))
    return {
        "instruction": rng.choice(INSTRUCTIONS),
        "input": f"患者{i}号，{days}天来{symptoms}，舌红苔黄，脉浮数。",
        "output": f"{med}可能适合治疗您的病症。以下是{med}的详细说明书：【功能主治】{rng.choice(FUNCS)}"
        f"【用法用量】口服，一次{rng.randint(1, 9)}克，一日{rng.randint(1, 3)}次。【注意事项】忌烟、酒及辛辣食物。",
    }


def bad_record(rng: random.Random, rec: dict) -> dict | str:
    kind = rng.randrange(6)
    if kind == 0:
        return {**rec, "input": rng.randint(0, 99)}  # number where text belongs
    if kind == 1:
        return {**rec, "output": None}  # null
    if kind == 2:
        return {**rec, "output": "  "}  # blank answer
    if kind == 3:
        return {**rec, "output": rec["output"] + "\x07"}  # control character
    if kind == 4:
        return json.dumps(rec, ensure_ascii=False)[:-9]  # broken line
    return {"instruction": rec["instruction"]}  # missing output


def variant(rng: random.Random, rec: dict) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        return dict(rec)
    if kind == 1:
        return {**rec, "input": "  " + rec["input"] + "\n", "output": rec["output"] + " "}
    return {**rec, "output": rec["output"].translate(str.maketrans("0123456789", "０１２３４５６７８９"))}


def near_variant(rng: random.Random, rec: dict) -> dict:
    text = rec["input"]
    if rng.random() < 0.5:
        return {**rec, "input": text.replace("，", "、", 1).replace("。", "！")}  # punctuation
    i = rng.randrange(len(text))
    return {**rec, "input": text[:i] + rng.choice(SYMPTOMS)[0] + text[i + 1 :]}  # one character


def generate(raw: Path, rows: int, files: int, seed: int, minified: bool = False) -> dict:
    rng = random.Random(seed)
    raw.mkdir(parents=True, exist_ok=True)
    kept: list[dict] = []
    per_file = -(-rows // files)
    counts = {"rows": 0, "duplicates": 0, "near_duplicates": 0, "bad": 0}
    for f in range(files):
        as_array = minified or f % 4 == 3  # one file in four is a JSON array, the others JSON Lines
        items: list = []
        for _ in range(min(per_file, rows - counts["rows"])):
            r = rng.random()
            if r < 0.02 and kept:
                items.append(variant(rng, rng.choice(kept)))
                counts["duplicates"] += 1
            elif r < 0.03:
                items.append(bad_record(rng, make_record(rng, counts["rows"])))
                counts["bad"] += 1
            elif r < 0.04 and kept:
                items.append(near_variant(rng, rng.choice(kept)))
                counts["near_duplicates"] += 1
            else:
                rec = make_record(rng, counts["rows"])
                items.append(rec)
                if len(kept) < 100_000:
                    kept.append(rec)
            counts["rows"] += 1
        path = raw / f"part-{f:03d}.{'json' if as_array else 'jsonl'}"
        with open(path, "w", encoding="utf-8") as fh:
            if as_array:
                items = [i if isinstance(i, dict) else {"broken": i} for i in items]
                json.dump(items, fh, ensure_ascii=False, indent=None if minified else 1)  # minified: one line
            else:
                for i in items:
                    fh.write((i if isinstance(i, str) else json.dumps(i, ensure_ascii=False)) + "\n")
    counts["bytes"] = sum(p.stat().st_size for p in raw.iterdir())
    return counts


# ----------------------------------------------------------------------------- runners


def run_pipeline(raw: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    import great_expectations  # noqa: F401  (import cost reported apart)

    from pipeline.stages.alpaca_dataset import write_alpaca
    from pipeline.stages.deduplicated_records import deduplicate_to
    from pipeline.stages.raw_records import ingest_to
    from pipeline.stages.raw_records.workers import peak_rss_mb
    from pipeline.stages.rejected_records import write_rejected
    from pipeline.stages.validated_records import validate_to

    imports = time.perf_counter() - t0
    t = time.perf_counter()
    stages, rss = {}, {}
    st = out / "stages"

    def timed(name, fn):
        s = time.perf_counter()
        result = fn()
        stages[name] = round(time.perf_counter() - s, 2)
        rss[name] = round(peak_rss_mb())
        return result

    raw_rows = timed("ingest", lambda: ingest_to(raw, st / "raw_records"))
    valid = timed("validate", lambda: validate_to(raw_rows, st / "validated_records"))
    dedup = timed("dedup", lambda: deduplicate_to(valid, st / "deduplicated_records"))
    counts = timed("alpaca", lambda: write_alpaca(dedup, out / "alpaca.parquet", 0.1))
    rejected = timed("rejected", lambda: write_rejected([raw_rows, valid, dedup], out / "rejected.parquet"))
    elapsed = time.perf_counter() - t
    return {
        "seconds": elapsed,
        "imports_s": imports,
        "stages_s": stages,
        "peak_rss_after_mb": rss,
        "workers": raw_rows.stats["workers"],
        "workers_peak_rss_mb": raw_rows.stats["workers_peak_rss_mb"],
        "rows_read": raw_rows.stats["rows_read"],
        "rows_kept": counts["rows"],
        "rows_rejected": rejected["rows"],
        "near_duplicate_groups": dedup.stats["near_duplicate_groups"],
        "near_duplicate_rows": dedup.stats["near_duplicate_rows"],
        "dedup_s": dedup.stats["seconds"],
    }


def run_naive(raw: Path, out: Path) -> dict:
    """The notebook way: json.load, then one Python loop per row with the same checks."""
    t0 = time.perf_counter()
    import hashlib
    import re
    import unicodedata

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasketch import MinHash, MinHashLSH

    from pipeline.stages.deduplicated_records import NEAR_THRESHOLD
    from pipeline.stages.validated_records import (
        CONTROL_CHARS_REGEX,
        INVALID_UNICODE_REGEX,
        NOT_BLANK_REGEX,
        WHITESPACE,
    )

    imports = time.perf_counter() - t0
    t = time.perf_counter()
    control = re.compile(CONTROL_CHARS_REGEX)
    invalid = re.compile(INVALID_UNICODE_REGEX)
    not_blank = re.compile(NOT_BLANK_REGEX)
    ws = re.compile(f"[{WHITESPACE}]+")
    limits = {"instruction": (1, 4000), "input": (0, 16000), "output": (1, 16000)}

    def norm(s: str) -> str:
        return ws.sub(" ", unicodedata.normalize("NFKC", s)).strip(" ")

    lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=128)
    group_of: dict[int, str] = {}  # row → its near group's first prompt_id
    kept, rejected = [], []
    seen: dict[str, int] = {}
    prompts: dict[str, int] = {}
    n_read = 0
    for path in sorted(raw.rglob("*.json*")):
        rel = path.relative_to(raw).as_posix()
        if path.suffix == ".json":
            rows = list(enumerate(json.load(open(path, encoding="utf-8")), start=1))
        else:
            rows = []
            for lineno, line in enumerate(open(path, encoding="utf-8"), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except ValueError as exc:
                    rows.append((lineno, exc))
        for lineno, obj in rows:
            n_read += 1
            reason = None
            if isinstance(obj, Exception):
                reason = f"invalid JSON: {obj}"
            elif not isinstance(obj, dict):
                reason = "not an object"
            else:
                fields = {
                    "instruction": obj.get("instruction"),
                    "input": obj.get("input", ""),
                    "output": obj.get("output"),
                }
                for k, v in fields.items():
                    if v is None and k in obj:
                        reason = f"field {k!r} is null"
                    elif v is None:
                        reason = f"{k}: missing"
                    elif not isinstance(v, str):
                        reason = f"field {k!r} is not a string"
                    elif k != "input" and not not_blank.search(v):
                        reason = f"{k}: blank"
                    elif not limits[k][0] <= len(v) <= limits[k][1]:
                        reason = f"{k}: length"
                    elif control.search(v):
                        reason = f"{k}: control characters"
                    elif invalid.search(v):
                        reason = f"{k}: invalid Unicode"
                    if reason:
                        break
            if reason is None:
                ni, nx, no = norm(fields["instruction"]), norm(fields["input"]), norm(fields["output"])
                prompt = f"{ni}\x1f{nx}"
                triple = f"{prompt}\x1f{no}"
                if triple in seen:
                    reason = f"duplicate of row {seen[triple]}"
                elif prompt in prompts:
                    reason = f"conflict with row {prompts[prompt]}"
            if reason:
                rejected.append({"source_file": rel, "source_line": lineno, "reason": reason, "raw": str(obj)})
                continue
            seen[triple] = n_read
            prompts[prompt] = n_read
            pid = hashlib.sha256(prompt.encode()).hexdigest()[:32]
            text = "".join(c for c in prompt.lower() if c.isalnum())
            m = MinHash(num_perm=128)
            m.update_batch([text[i : i + 2].encode() for i in range(max(1, len(text) - 1))])
            twins = lsh.query(m)
            group_of[n_read] = group_of[min(twins)] if twins else pid
            lsh.insert(n_read, m)
            gid = group_of[n_read]
            kept.append(
                {
                    "record_id": hashlib.sha256(triple.encode()).hexdigest()[:32],
                    "prompt_id": pid,
                    **fields,
                    "split": "eval" if int(gid[:16], 16) / 2.0**64 < 0.1 else "train",
                    "source_file": rel,
                    "source_line": lineno,
                }
            )
    pq.write_table(pa.Table.from_pylist(kept), out / "alpaca_naive.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist(rejected), out / "rejected_naive.parquet", compression="zstd")
    elapsed = time.perf_counter() - t
    return {
        "seconds": elapsed,
        "imports_s": imports,
        "rows_read": n_read,
        "rows_kept": len(kept),
        "rows_rejected": len(rejected),
    }


def child(which: str, raw: str, out: str) -> None:
    from pipeline.stages.raw_records.workers import peak_rss_mb

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    result = (run_pipeline if which == "pipeline" else run_naive)(Path(raw), Path(out))
    result["own_peak_rss_mb"] = peak_rss_mb()
    result.setdefault("workers_peak_rss_mb", [])
    print("RESULT " + json.dumps(result))


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants at this moment, in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total / 1024


def measure(which: str, raw: Path, out: Path) -> dict:
    """Run one side in a child process; besides each process's own peak (VmHWM), sample the memory
    of the child and its workers together every 20 ms (the peak of their sum)."""
    import threading

    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", which, "--raw", str(raw), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["tree_peak_rss_mb"] = peak[0]
            result["peak_rss_mb"] = max(peak[0], result["own_peak_rss_mb"])
            return result
    raise RuntimeError(f"{which} run failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--minified", action="store_true", help="every file a JSON array on one line (as json.dump writes it)"
    )
    ap.add_argument("--naive-max-rows", type=int, default=1_000_000, help="skip the in-memory baseline above this")
    ap.add_argument("--child", choices=["pipeline", "naive"])
    ap.add_argument("--raw")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.raw, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        out.mkdir()
        t = time.perf_counter()
        gen = generate(raw, args.rows, args.files, args.seed, args.minified)
        print(
            f"generated {gen['rows']:,} rows ({gen['duplicates']:,} duplicates, {gen['near_duplicates']:,} near "
            f"duplicates, {gen['bad']:,} bad) in "
            f"{args.files} files, {gen['bytes'] / 1e6:.0f} MB, in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
        pipe = measure("pipeline", raw, out)
        pipe_rps = pipe["rows_read"] / pipe["seconds"]
        print(
            f"pipeline: {pipe['seconds']:.1f} s, {pipe_rps:,.0f} rows/s, peak RSS {pipe['peak_rss_mb']:.0f} MB "
            f"(process and its workers together, sampled every 20 ms; own peaks: this process "
            f"{pipe['own_peak_rss_mb']:.0f} MB, {pipe['workers']} ingest workers {pipe['workers_peak_rss_mb']} MB), "
            f"stages {pipe['stages_s']} (s), peak RSS after each {pipe['peak_rss_after_mb']} (MB), "
            f"imports {pipe['imports_s']:.1f} s",
            flush=True,
        )
        summary = {
            "rows": gen["rows"],
            "files": args.files,
            "layout": "minified arrays" if args.minified else "JSON Lines + pretty arrays",
            "input_mb": round(gen["bytes"] / 1e6, 1),
            "pipeline_seconds": round(pipe["seconds"], 1),
            "pipeline_rows_per_s": round(pipe_rps),
            "pipeline_peak_rss_mb": round(pipe["peak_rss_mb"]),
            "pipeline_stages_s": pipe["stages_s"],
            "pipeline_own_peak_rss_mb": round(pipe["own_peak_rss_mb"]),
            "pipeline_workers_peak_rss_mb": pipe["workers_peak_rss_mb"],
            "pipeline_workers_plus_own_peak_rss_mb": round(pipe["own_peak_rss_mb"] + sum(pipe["workers_peak_rss_mb"])),
            "pipeline_rows_kept": pipe["rows_kept"],
            "pipeline_rows_rejected": pipe["rows_rejected"],
            "pipeline_near_duplicate_groups": pipe["near_duplicate_groups"],
            "pipeline_near_duplicate_rows": pipe["near_duplicate_rows"],
            "pipeline_dedup_s": pipe["dedup_s"],
        }
        if gen["rows"] <= args.naive_max_rows:
            naive = measure("naive", raw, out)
            naive_rps = naive["rows_read"] / naive["seconds"]
            print(
                f"naive:    {naive['seconds']:.1f} s, {naive_rps:,.0f} rows/s, peak RSS {naive['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            summary.update(
                {
                    "naive_rows_per_s": round(naive_rps),
                    "ratio": round(pipe_rps / naive_rps, 2),
                    "naive_peak_rss_mb": round(naive["peak_rss_mb"]),
                    "naive_rows_kept": naive["rows_kept"],
                    "naive_rows_rejected": naive["rows_rejected"],
                }
            )
        else:
            print(f"naive:    skipped above {args.naive_max_rows:,} rows (it holds every row in memory)", flush=True)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
