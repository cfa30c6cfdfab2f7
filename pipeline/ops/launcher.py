"""The run launcher named in ``pipeline/dagster.yaml``: Dagster's default one, which tags each run
with this host before it starts the run's process.

On an instance that several machines share, ``pipeline.ops.recover`` judges a run by its
``medtune/host`` tag (a pid means something only on its own host). Tagged here, a run launched by
the UI, the sensor or the queue is judged even when its process died before its first step; runs
executed in the launching process (``make run``'s ``dagster asset materialize``) are tagged by the
``data_root`` resource as their first step starts.
"""

from __future__ import annotations

from dagster import DefaultRunLauncher

from pipeline.core.stores import tag_run_host


class HostTaggingRunLauncher(DefaultRunLauncher):
    def launch_run(self, context) -> None:
        tag_run_host(
            self._instance, context.dagster_run.run_id, lambda message: print(f"HostTaggingRunLauncher: {message}")
        )
        super().launch_run(context)
