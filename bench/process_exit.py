"""Benchmark: how long a process that has loaded the pipeline's libraries takes to exit, side by side
in one run: the interpreter's ordinary teardown, with the collector frozen at exit (what every
process that loads the code location does: ``pipeline.core.quick_exit.freeze_at_exit``) and with
``exit_now`` (what a training child does once its work is reported).

    python bench/process_exit.py [--rounds 4]

Each round starts one process per way, in turn; each imports the code location and the training
libraries a run loads (Great Expectations, MLflow, torch, transformers, peft), prints the time and ends.
Printed: the median seconds
from that print to the process's end, per way. Last line, JSON: the same figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

CHILD = """
import atexit, gc, sys, time
import great_expectations, mlflow, peft, torch, transformers
import pipeline.definitions
from pipeline.core.quick_exit import exit_now
way = sys.argv[1]
if way == "teardown":
    atexit.unregister(gc.freeze)  # the ordinary exit
print(time.time(), len(gc.get_objects()), flush=True)
if way == "exit_now":
    exit_now(0)
"""

WAYS = ("teardown", "freeze", "exit_now")


def one(way: str) -> tuple[float, int]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, way], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    said = proc.stdout.readline().split()
    proc.wait()
    end = time.time()
    if proc.returncode != 0 or len(said) != 2:
        raise SystemExit(f"the {way} process failed (exit code {proc.returncode})")
    return end - float(said[0]), int(said[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    objects = 0
    for r in range(args.rounds):
        for way in WAYS:
            took, objects = one(way)
            seconds[way].append(took)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{w} {seconds[w][-1]:.2f} s" for w in WAYS), flush=True)
    medians = {way: round(statistics.median(s), 3) for way, s in seconds.items()}
    print(
        f"{objects:,} objects tracked by the collector at exit; median seconds from the last line to the process's end:"
    )
    for way in WAYS:
        print(f"  {way:9s} {medians[way]:6.2f} s")
    print(json.dumps({"rounds": args.rounds, "tracked_objects": objects, "exit_seconds": medians}))


if __name__ == "__main__":
    main()
