"""Tables read and written a chunk at a time, so that the data stages hold a bounded number of
rows in memory whatever the size of the corpus.

* Between data stages: an Arrow IPC file per table (``kept.arrow``, ``rejected.arrow``), LZ4
  compressed, one record batch per chunk: writing and reading it costs little next to the
  stages' own work. Read with ordinary reads, never memory-mapped (mapped pages would count as
  the process's memory).
* Final outputs (``alpaca.parquet``, ``rejected.parquet``): Parquet with the fixed settings of
  ``pipeline.stages.alpaca_dataset.write_parquet``, in row groups of exactly
  ``ROW_GROUP_SIZE`` rows, so a file written chunk by chunk is byte-identical to one written
  from the whole table at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline.core.atomic import atomic_path

# Rows a data stage holds at once (the DataRoot resource's ``chunk_rows`` sets it for the assets).
CHUNK_ROWS = 100_000
# Parquet row group size of the final outputs: fixed, part of the byte-identical file layout.
ROW_GROUP_SIZE = 100_000
IPC_OPTIONS = ipc.IpcWriteOptions(compression="lz4")
PARQUET_SETTINGS = {"compression": "zstd", "write_statistics": True, "store_schema": True}

# Arrow's large strings come back as pandas' Arrow-backed ``str`` dtype, as pd.read_parquet gives.
_STRING = pd.StringDtype("pyarrow", na_value=float("nan"))
_TYPES = {pa.large_string(): _STRING, pa.string(): _STRING}.get


def to_frame(table: pa.Table | pa.RecordBatch) -> pd.DataFrame:
    """An Arrow chunk as pandas, with the dtypes ``pd.read_parquet`` gives the same columns."""
    return table.to_pandas(types_mapper=_TYPES)


def to_arrow(df: pd.DataFrame) -> pa.Table:
    """Arrow table with plain ``string`` columns (readable everywhere); ``large_string`` is
    kept only where a column is too large for 32-bit offsets."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    fields = [pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    try:
        return table.cast(pa.schema(fields, metadata=table.schema.metadata))
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        return table


class ChunkWriter:
    """Append chunks (pandas or Arrow) to one table file; the file appears, complete, on ``close``.

    ``kind="parquet"``: the final-output layout (row groups of ``ROW_GROUP_SIZE`` rows, zstd).
    ``kind="arrow"``: an Arrow IPC file between stages (one record batch per chunk).
    ``empty`` gives the layout of a table with no rows, written when no chunk came.
    Use as a context manager: an exception discards the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str = "parquet",
        empty: pd.DataFrame | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ):
        self.path = Path(path)
        self.kind = kind
        # rows per Parquet row group (fixed) or per Arrow record batch (the stages' chunk size)
        self.group_rows = ROW_GROUP_SIZE if kind == "parquet" else max(1, int(chunk_rows))
        self.empty = empty
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        self._writer = None
        self._file = None  # the open temporary file, closed by us whatever happens
        self._schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        raised = self._abort(exc_type, exc, tb)
        if raised is not None and raised is not exc:
            raise raised  # the write error, naming the file
        return False

    def _table(self, chunk: pd.DataFrame | pa.Table | pa.RecordBatch) -> pa.Table:
        if isinstance(chunk, pd.DataFrame):
            table = to_arrow(chunk.reset_index(drop=True))
        elif isinstance(chunk, pa.RecordBatch):
            table = pa.Table.from_batches([chunk])
        else:
            table = chunk
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            table = table.cast(self._schema)
        return table

    def write(self, chunk: pd.DataFrame | pa.Table | pa.RecordBatch) -> None:
        if len(chunk) == 0:
            return
        table = self._table(chunk)
        self.rows += len(table)
        # whole groups only, so that the chunks written never show in the file
        self._pending.append(table)
        self._pending_rows += len(table)
        if self._pending_rows >= self.group_rows:
            self._flush(final=False)

    def _open(self) -> None:
        if self._writer is not None:
            return
        self._file = pa.OSFile(str(self._tmp), "wb")
        if self.kind == "arrow":
            self._writer = ipc.new_file(self._file, self._schema, options=IPC_OPTIONS)
        else:
            self._writer = pq.ParquetWriter(self._file, self._schema, **PARQUET_SETTINGS)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        n = self.group_rows
        whole = len(table) if final else len(table) - len(table) % n
        self._open()
        if self.kind == "parquet" and whole:
            self._writer.write_table(table.slice(0, whole), row_group_size=n)
        elif whole:
            for start in range(0, whole, n):
                self._writer.write_table(table.slice(start, min(n, whole - start)).combine_chunks())
        rest = table.slice(whole)
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)

    def close(self) -> Path:
        try:
            self._close()
        except BaseException as exc:
            raise (self._abort(type(exc), exc, exc.__traceback__) or exc) from None
        return self.path

    def _close(self) -> None:
        if self._writer is None and not self._pending:
            template = self.empty if self.empty is not None else pd.DataFrame()
            table = to_arrow(template)
            if self.kind == "arrow":
                with ipc.new_file(str(self._tmp), table.schema, options=IPC_OPTIONS):
                    pass
            else:
                pq.write_table(table, str(self._tmp), row_group_size=ROW_GROUP_SIZE, **PARQUET_SETTINGS)
        else:
            self._flush(final=True)
            self._writer.close()
            self._file.close()
        self._writer = self._file = None
        self._stack.close()  # renames the temporary file into place

    def _abort(self, exc_type, exc, tb) -> BaseException | None:
        """Close and remove the temporary file (the destination stays as it was); returns the
        exception to raise (a write error names the file)."""
        for closing in (self._writer, self._file):
            with contextlib.suppress(Exception):
                if closing is not None:
                    closing.close()
        self._writer = self._file = None
        try:
            self._stack.__exit__(exc_type, exc, tb)
        except BaseException as raised:  # noqa: BLE001  (handed back to the caller)
            return raised
        return None


def iter_chunks(
    path: str | os.PathLike, rows: int = CHUNK_ROWS, columns: list[str] | None = None
) -> Iterator[pd.DataFrame]:
    """A table file (Arrow IPC or Parquet) as pandas chunks of at most ``rows`` rows."""
    for batch in iter_batches(path, rows, columns):
        yield to_frame(batch)


def iter_batches(
    path: str | os.PathLike, rows: int = CHUNK_ROWS, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    path = Path(path)
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=rows, columns=columns):
            yield pa.Table.from_batches([batch], schema=batch.schema.with_metadata(pf.schema_arrow.metadata))
        return
    with pa.OSFile(str(path)) as source:
        reader = ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            table = pa.Table.from_batches([batch])
            if columns is not None:
                table = table.select(columns)
            for start in range(0, len(table), rows):
                yield table.slice(start, rows)


def count_rows(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.OSFile(str(path)) as source:
        reader = ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """A whole table file as one pandas frame (small tables, tests)."""
    chunks = list(iter_chunks(path, rows=1 << 62))
    if not chunks:
        path = Path(path)
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        with pa.OSFile(str(path)) as source:
            return to_frame(ipc.open_file(source).read_all())
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


def head(path: str | os.PathLike, n: int = 10, columns: list[str] | None = None) -> pd.DataFrame:
    """The first ``n`` rows of a table file (previews), reading no more than one chunk."""
    for chunk in iter_chunks(path, rows=n, columns=columns):
        return chunk
    return read_table(path) if columns is None else read_table(path)[columns]
