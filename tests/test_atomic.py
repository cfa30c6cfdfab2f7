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


def test_every_file_is_on_disk_before_the_folder_is_published(tmp_path, monkeypatch):
    """What a power cut after the rename would otherwise bring back as empty files."""
    synced, published = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        published.append((str(src), set(synced)))
        real_replace(src, dst)

    monkeypatch.setattr("pipeline.core.atomic.os.fsync", fsync)
    monkeypatch.setattr("pipeline.core.atomic.os.replace", replace)
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "model.safetensors").write_bytes(b"w" * 100)
        (tmp / "sub" / "state.json").write_text("{}")
        names = [str(tmp / "model.safetensors"), str(tmp / "sub" / "state.json"), str(tmp / "sub"), str(tmp)]
    src, before = published[-1]
    assert src == names[-1]
    assert all(n in before for n in names), f"not fsynced before publishing: {[n for n in names if n not in before]}"


def _write_many(dest, tag, rounds):
    for i in range(rounds):
        with atomic_dir(dest) as tmp:
            (tmp / "who").write_text(f"{tag} {i}")
            (tmp / "pad").write_bytes(os.urandom(2048))


def test_concurrent_writers_of_one_folder_never_fail(tmp_path):
    """Two runs writing one folder at once (the same cache entry): the renames are serialised, no
    'Directory not empty', and the folder is always one writer's whole version."""
    import multiprocessing

    dest = tmp_path / "entry"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(dest, tag, 60)) for tag in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(p.name for p in dest.iterdir()) == ["pad", "who"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
