import errno
import os

import pytest

from pipeline.core.atomic import OutputWriteError, atomic_dir, atomic_path


def test_failed_file_write_keeps_the_previous_version(tmp_path):
    dest = tmp_path / "out.parquet"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
    assert dest.read_text() == "new"


def test_failed_dir_write_keeps_the_previous_version(tmp_path):
    dest = tmp_path / "model"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "a").write_text("v2-partial")
            raise RuntimeError("boom")
    assert (dest / "a").read_text() == "v1"
    with atomic_dir(dest) as tmp:
        (tmp / "b").write_text("v2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path):
    stale = tmp_path / ".tmp-out.json.999999999.abc"
    stale.write_text("left by a killed process")
    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    assert not stale.exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, err):
    dest = tmp_path / "alpaca.parquet"
    dest.write_text("old")

    def failing_replace(src, dst):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr("pipeline.core.atomic.os.replace", failing_replace)
    with pytest.raises(OutputWriteError, match=f"could not write {dest}: {os.strerror(err)}"):
        with atomic_path(dest) as tmp:
            tmp.write_text("new")
    monkeypatch.undo()
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["alpaca.parquet"]
