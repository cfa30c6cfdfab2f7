"""Dagster Pipes messages read whole: a file reader that keeps a partial line until its newline.

Dagster's ``PipesFileMessageReader`` tails the message file with ``readline()``, which hands back
half a line when it reads while the child is still writing it; ``json.loads`` then fails, the
reader thread dies and every later message (progress, the materialization) is lost while the step
stays green. This reader yields only complete lines (a last unterminated line is tried once the
session closes) and logs, rather than dies on, a line that is not JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dagster import PipesFileMessageReader, PipesTempFileMessageReader

POLL_S = 0.01


def tail_lines(path: str, should_stop: Callable[[], bool], poll_s: float = POLL_S) -> Iterator[str]:
    """Complete lines appended to ``path`` until ``should_stop()`` and the file is drained; bytes
    after the last newline wait for the rest of their line (yielded at the end if never ended)."""
    pending = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 16)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line.decode("utf-8", errors="replace")
                continue
            if should_stop():
                chunk = fh.read()  # the writer may have finished between the read above and the check
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    yield from (line.decode("utf-8", errors="replace") for line in lines if line.strip())
                if pending.strip():
                    yield pending.decode("utf-8", errors="replace")
                return
            time.sleep(poll_s)


class WholeLineFileMessageReader(PipesFileMessageReader):
    """``PipesFileMessageReader`` that never parses half a line and survives a bad one."""

    def _reader_thread(self, handler, is_resource_complete) -> None:
        try:
            for line in tail_lines(self._path, is_resource_complete.is_set):
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    print(
                        f"medtune: a Pipes message that is not JSON was skipped ({exc}): {line[:200]!r}",
                        file=sys.stderr,
                    )
                    continue
                handler.handle_message(message)
        except:  # noqa: E722 (as Dagster's reader: report, then end the thread)
            handler.report_pipes_framework_exception(f"{self.__class__.__name__} reader thread", sys.exc_info())
            raise


class WholeLineTempFileMessageReader(PipesTempFileMessageReader):
    """The default subprocess reader (a temporary message file), reading whole lines."""

    @contextmanager
    def read_messages(self, handler):
        with tempfile.TemporaryDirectory() as tempdir:
            reader = WholeLineFileMessageReader(
                os.path.join(tempdir, "messages"), include_stdio_in_messages=self._include_stdio_in_messages
            )
            with reader.read_messages(handler) as params:
                yield params
