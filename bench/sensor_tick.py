"""Benchmark: what one tick of ``raw_data_sensor`` costs over a large raw folder that does not
change, and that a changed file is still noticed; side by side with the uncached fingerprint (every
byte read, what each tick cost before the per-file cache).

    python bench/sensor_tick.py [--gb 4] [--files 16] [--ticks 10]

Writes ``--gb`` GB of JSON Lines in ``--files`` files under a temporary data root, then runs the
real sensor (``build_sensor_context`` on an ephemeral instance: dead-run recovery, run-data
pruning, the fingerprint, the debounce) once cold and ``--ticks`` times over the unchanged folder,
appends one row to one file and ticks again. Printed: seconds per way; goal: an unchanged tick
under 0.1 s. Last line, JSON: the same figures. The folder is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL_S = 0.1


def write_raw(raw: Path, gb: float, files: int) -> int:
    line = (
        json.dumps(
            {
                "instruction": "使用中医知识正确回答适合这个病例的中成药。",
                "input": "咳嗽发热，咽喉肿痛。" * 8,
                "output": "板蓝根颗粒。" * 40,
            },
            ensure_ascii=False,
        )
        + "\n"
    ).encode()
    per_file = int(gb * 1e9 / files)
    block = line * max(1, (1 << 22) // len(line))
    total = 0
    raw.mkdir(parents=True)
    for i in range(files):
        with open(raw / f"part-{i:03d}.jsonl", "wb") as fh:
            written = 0
            while written < per_file:
                fh.write(block)
                written += len(block)
        total += written
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=4.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--ticks", type=int, default=10)
    args = parser.parse_args()

    from dagster import DagsterInstance, build_sensor_context

    from pipeline.definitions import defs
    from pipeline.ops import automation
    from pipeline.stages.raw_records import raw_fingerprint
    from resources.data_root import DataRoot

    work = Path(tempfile.mkdtemp(prefix="medtune-sensor-bench-"))
    try:
        root = DataRoot(path=str(work / "data"))
        t0 = time.perf_counter()
        size = write_raw(root.raw_dir, args.gb, args.files)
        print(f"raw folder: {size / 1e9:.2f} GB in {args.files} files, written in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        uncached = raw_fingerprint(root.raw_dir)
        full_s = time.perf_counter() - t0
        print(f"uncached fingerprint (every byte read): {full_s:.2f} s ({size / 1e9 / full_s:.2f} GB/s)")

        sensor = defs.get_sensor_def("raw_data_sensor")
        instance = DagsterInstance.ephemeral()
        automation.SENSOR["quiet_seconds"] = 0

        def tick(cursor):
            ctx = build_sensor_context(instance=instance, cursor=cursor, resources={"data_root": root})
            t = time.perf_counter()
            result = sensor.evaluate_tick(ctx)
            return time.perf_counter() - t, result, ctx.cursor

        cold_s, _, cursor = tick(None)
        print(f"first tick (hashes every file once, caches the digests): {cold_s:.2f} s")
        steady = []
        for _ in range(args.ticks):
            took, result, cursor = tick(cursor)
            assert not result.run_requests, "an unchanged folder requested a run"
            steady.append(took)
        median = statistics.median(steady)
        print(
            f"unchanged tick, median of {args.ticks}: {median * 1000:.1f} ms (max {max(steady) * 1000:.1f} ms); goal < "
            f"{GOAL_S * 1000:.0f} ms"
        )
        with open(root.raw_dir / "part-000.jsonl", "ab") as fh:
            fh.write(b'{"instruction": "x", "input": "y", "output": "z"}\n')
        changed_s, _, cursor = tick(cursor)
        settled_s, result, cursor = tick(cursor)
        noticed = len(result.run_requests) == 1 and raw_fingerprint(root.raw_dir) != uncached
        print(
            f"one file appended to: tick {changed_s:.2f} s (that file read again), next tick {settled_s * 1000:.1f} "
            f"ms, run requested: {noticed}"
        )
        figures = {
            "raw_gb": round(size / 1e9, 2),
            "files": args.files,
            "uncached_fingerprint_s": round(full_s, 3),
            "first_tick_s": round(cold_s, 3),
            "unchanged_tick_median_s": round(median, 4),
            "unchanged_tick_max_s": round(max(steady), 4),
            "changed_file_tick_s": round(changed_s, 3),
            "change_noticed": noticed,
            "goal_met": median < GOAL_S and noticed,
        }
        print(json.dumps(figures))
        instance.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
