"""Pipes messages reach the asset whole (a writer that splits each line in two), and a training
child that ended without its report fails the step instead of leaving it green without figures."""

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.stages.lora_adapter import TRAINING_RECORD
from pipeline.stages.lora_adapter.report import MissingReport, child_report
from resources.pipes_reader import WholeLineFileMessageReader, tail_lines

MESSAGES = [
    {
        "__dagster_pipes_version": "0.1",
        "method": "log",
        "params": {"message": f"step {i} " + "損失" * 40, "level": "INFO"},
    }
    for i in range(20)
]


def torn_writer(path: Path, lines: list[str], pause_s: float = 0.03) -> threading.Thread:
    """Append each line in two writes, flushed, with a pause between (what a reader sees when it
    reads while the child is writing)."""

    def write():
        with open(path, "ab", buffering=0) as fh:
            for line in lines:
                data = (line + "\n").encode()
                fh.write(data[: len(data) // 2])
                time.sleep(pause_s)
                fh.write(data[len(data) // 2 :])

    t = threading.Thread(target=write)
    t.start()
    return t


def test_dagster_tail_file_hands_back_half_a_line(tmp_path):
    """The upstream behaviour this module exists for (docs/reliability.md keeps it as a reproduction)."""
    from dagster._utils import tail_file

    path = tmp_path / "messages"
    path.write_text("")
    lines = [json.dumps(m) for m in MESSAGES[:3]]
    writer = torn_writer(path, lines)
    got = list(tail_file(str(path), lambda: not writer.is_alive()))
    writer.join()
    assert "".join(got) == "".join(line + "\n" for line in lines)
    assert any(not g.endswith("\n") for g in got), "every read was whole: the torn read was not reproduced"


def test_tail_lines_yields_only_whole_lines(tmp_path):
    path = tmp_path / "messages"
    path.write_text("")
    lines = [json.dumps(m, ensure_ascii=False) for m in MESSAGES]
    writer = torn_writer(path, lines)
    got = list(tail_lines(str(path), lambda: not writer.is_alive()))
    writer.join()
    assert got == lines
    # a last line never ended is tried once the session closes
    path.write_text('{"a": 1}\n{"b": 2}')
    assert list(tail_lines(str(path), lambda: True)) == ['{"a": 1}', '{"b": 2}']


class Handler:
    def __init__(self):
        self.messages, self.errors = [], []

    def handle_message(self, message):
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin, exc_info):
        self.errors.append((origin, exc_info))


def test_reader_thread_gets_every_torn_message_and_skips_a_bad_line(tmp_path, capfd):
    handler = Handler()
    path = tmp_path / "messages"
    reader = WholeLineFileMessageReader(str(path))
    with reader.read_messages(handler):
        lines = (
            [json.dumps(m, ensure_ascii=False) for m in MESSAGES[:10]]
            + ["not json {"]
            + [json.dumps(m) for m in MESSAGES[10:]]
        )
        torn_writer(path, lines).join()
    assert handler.messages == MESSAGES
    assert handler.errors == []
    assert "not JSON was skipped" in capfd.readouterr().err


def test_child_report_from_pipes_from_disk_or_a_clear_failure(tmp_path):
    warnings = []
    figures = {"steps": 6, "mfu": 0.3}
    assert child_report([figures], tmp_path, warnings.append) == figures
    assert warnings == []
    with pytest.raises(MissingReport, match="exited without its report.*holds no result"):
        child_report([], tmp_path, warnings.append)
    with pytest.raises(MissingReport):
        child_report([{}], tmp_path, warnings.append)  # a materialization without the figures
    (tmp_path / TRAINING_RECORD).write_text(json.dumps({"spec": {}, "result": figures}))
    assert child_report([], tmp_path, warnings.append) == figures
    assert "did not arrive through Dagster Pipes" in warnings[0]
