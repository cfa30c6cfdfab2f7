"""pipeline.core.pool: batches of an Arrow file in worker processes, one core each."""

import os

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from pipeline.core.pool import cores_here, map_batches


def _report(path: str, index: int) -> tuple[int, int, int]:
    """In a worker: the batch number, the cores it may use with threads, Arrow's thread count."""
    return index, cores_here(), pa.cpu_count()


@pytest.mark.slow
def test_workers_run_batches_in_order_each_on_one_core(tmp_path):
    path = tmp_path / "rows.arrow"
    table = pa.table({"x": list(range(10))})
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    got = list(map_batches(path, _report, (), 2))
    assert [g[0] for g in got] == [0, 1, 2, 3]
    assert all(g[1:] == (1, 1) for g in got)  # the pool gives each core a process: no threads on top
    assert cores_here() == (os.cpu_count() or 1)  # this process is not a worker
