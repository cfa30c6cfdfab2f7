"""Remove the data folders of runs nothing can read any more (``processed/runs/<run id>/``).

Each run writes its data outputs into a folder of its own and never rewrites them
(``resources/stage_io.py``), so folders pile up. A folder is kept while its run has not finished,
while it holds the latest materialization of an asset (what the next run that does not rebuild
that asset will read), while a kept folder's descriptors point into it (a run that pinned an
earlier run's output), and while its run is unknown to this instance and younger than a day (a run
of another instance over the same data root). ``pipeline.ops.recover`` (``make run``, ``make ui``)
and ``raw_data_sensor`` call it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

UNKNOWN_RUN_GRACE_S = 24 * 3600


def _descriptors(folder: Path) -> dict[str, dict]:
    out = {}
    for path in folder.glob("*.json"):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def _referenced_runs(payload, runs_dir: Path) -> set[str]:
    """Run ids whose folder a descriptor's paths point into."""
    found: set[str] = set()
    if isinstance(payload, dict):
        for value in payload.values():
            found |= _referenced_runs(value, runs_dir)
    elif isinstance(payload, list):
        for value in payload:
            found |= _referenced_runs(value, runs_dir)
    elif isinstance(payload, str):
        for prefix in {f"{runs_dir}/", f"{runs_dir.resolve()}/"}:
            if payload.startswith(prefix):
                found.add(payload[len(prefix) :].split("/", 1)[0])
    return found


def prune_run_data(instance, runs_dir: str | Path, log=print) -> list[str]:
    """Delete the run folders under ``runs_dir`` that no run can read any more; returns their run ids."""
    from dagster import AssetKey

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    folders = {p.name: p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    descriptors = {run_id: _descriptors(folder) for run_id, folder in folders.items()}
    keep: set[str] = set()
    for asset in {name for d in descriptors.values() for name in d}:
        event = instance.get_latest_materialization_event(AssetKey(asset.split("__")))
        if event is not None:
            keep.add(event.run_id)
    for run_id, folder in folders.items():
        run = instance.get_run_by_id(run_id)
        if run is None:
            if time.time() - folder.stat().st_mtime < UNKNOWN_RUN_GRACE_S:
                keep.add(run_id)
        elif not run.is_finished:
            keep.add(run_id)
    todo = list(keep)
    while todo:  # and every folder a kept folder's descriptors point into
        for ref in (
            set().union(*(_referenced_runs(d, runs_dir) for d in descriptors.get(todo.pop(), {}).values())) - keep
        ):
            keep.add(ref)
            todo.append(ref)
    removed = sorted(set(folders) - keep)
    for run_id in removed:
        shutil.rmtree(folders[run_id], ignore_errors=True)
    if removed:
        log(
            f"removed the data of {len(removed)} finished runs that nothing reads any more "
            f"({', '.join(r[:8] for r in removed)})"
        )
    return removed
