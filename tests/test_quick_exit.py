"""A process that loads the code location freezes the collector at exit, after its work; a training
child that succeeded ends through exit_now: exit handlers run and output flushed, then it exits."""

import subprocess
import sys
import textwrap
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )


def test_loading_the_code_location_freezes_the_collector_only_at_exit(tmp_path):
    probe = tmp_path / "probe.txt"
    done = python(
        f"""
        import atexit, gc
        # registered first, so it runs last: after the code location's handler
        atexit.register(lambda: open({str(probe)!r}, "w").write(str(gc.get_freeze_count())))
        import pipeline.definitions
        assert gc.get_freeze_count() == 0  # nothing frozen while the process works
        print("worked")
        """,
        tmp_path,
    )
    assert done.returncode == 0 and done.stdout == "worked\n", done.stderr
    assert int(probe.read_text()) > 0


def test_exit_now_runs_the_exit_handlers_flushes_and_keeps_the_code(tmp_path):
    probe = tmp_path / "probe.txt"
    done = python(
        f"""
        import atexit, logging, sys
        from pipeline.core.quick_exit import exit_now
        atexit.register(lambda: open({str(probe)!r}, "w").write("handler ran"))
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        logging.getLogger("child").info("logged")
        sys.stdout.write("unflushed, no newline")
        exit_now(3)
        print("never reached")
        """,
        tmp_path,
    )
    assert done.returncode == 3
    assert done.stdout == "unflushed, no newline" and "logged" in done.stderr
    assert probe.read_text() == "handler ran"
