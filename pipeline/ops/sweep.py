"""Run a sweep end to end: ``python -m pipeline.ops.sweep [PRESET.yaml]`` (``make sweep``).

The same three steps a user takes in the Dagster UI, as runs of this instance (``$DAGSTER_HOME``),
so each shows in the UI's run list and each trial in ``sweep_trial``'s partitions:

1. ``sweep_plan_job``: the data (cached stages are reused) and the plan; its trials become partitions;
2. ``sweep_trial_job`` once per trial partition: a failed trial is reported, the next one runs;
3. ``sweep_comparison_job``: the table and plots, in Dagster and on the MLflow parent run.

The preset is a run config (``ops:`` settings of the assets involved); each job is given the part
of it that concerns its own assets.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.stages.sweep_comparison import SweepComparison
from pipeline.stages.sweep_plan import SweepPlan

DEFAULT_PRESET = Path(__file__).parents[1] / "presets" / "sweep-cpu.yaml"


def config_for(job, run_config: dict) -> dict:
    """The run config's ``ops`` entries for the assets in ``job``."""
    names = {key.path[-1] for key in job.asset_layer.executable_asset_keys}
    return {"ops": {k: v for k, v in (run_config.get("ops") or {}).items() if k in names}}


@dataclass(frozen=True)
class SweepOutcome:
    """A whole sweep: its plan, whether each trial (by partition key) succeeded, the comparison."""

    plan: SweepPlan
    trials: dict[str, bool]
    comparison: SweepComparison


def run_sweep(defs, run_config: dict, instance, log=print) -> SweepOutcome:
    """Plan, every trial, comparison."""
    plan_job = defs.resolve_job_def("sweep_plan_job")
    planned = plan_job.execute_in_process(
        run_config=config_for(plan_job, run_config), instance=instance, raise_on_error=False
    )
    if not planned.success:
        raise RuntimeError(f"the sweep's plan failed (Dagster run {planned.run_id}): see its log")
    plan = planned.output_for_node("sweep_plan")
    log(f"sweep {plan.name}: {len(plan.partition_keys)} trials (MLflow parent run {plan.parent_run_id})")
    trial_job = defs.resolve_job_def("sweep_trial_job")
    outcomes: dict[str, bool] = {}
    for i, key in enumerate(plan.partition_keys, 1):
        t0 = time.perf_counter()
        result = trial_job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
        outcomes[key] = result.success
        log(
            f"[{i}/{len(plan.partition_keys)}] {key}: {'finished' if result.success else 'FAILED (recorded)'} in "
            f"{time.perf_counter() - t0:.0f} s"
        )
    comparison_job = defs.resolve_job_def("sweep_comparison_job")
    compared = comparison_job.execute_in_process(instance=instance, raise_on_error=False)
    if not compared.success:
        raise RuntimeError(f"the sweep's comparison failed (Dagster run {compared.run_id}): see its log")
    return SweepOutcome(plan, outcomes, compared.output_for_node("sweep_comparison"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default=str(DEFAULT_PRESET), help="run-config YAML (default: sweep-cpu)")
    args = ap.parse_args(argv)
    from dagster import DagsterInstance

    from pipeline.definitions import defs
    from pipeline.ops.recover import recover_dead_runs

    run_config = yaml.safe_load(Path(args.preset).read_text()) or {}
    t0 = time.perf_counter()
    with DagsterInstance.get() as instance:
        # a run killed outright keeps its training slot: freed first, or every trial would wait for it
        recover_dead_runs(instance)
        out = run_sweep(defs, run_config, instance)
    comparison = out.comparison
    print((Path(comparison.path) / "comparison.md").read_text())
    print(
        f"\nsweep {comparison.name}: {comparison.counts} in {time.perf_counter() - t0:.0f} s; "
        f"best held-out loss: {comparison.best_trial}; table, plots: {comparison.path}"
    )
    return 0 if all(out.trials.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
