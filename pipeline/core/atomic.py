"""Write outputs so that a reader never sees a half-written file or folder.

Everything is written under a temporary name in the destination's own folder (same file
system) and moved into place with ``os.replace`` once complete. A crash leaves at most a
``.tmp-*`` sibling behind, which no later step reads and the next write cleans up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


class OutputWriteError(OSError):
    """An output could not be written; the message names the path and the reason."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file and folder under ``folder`` on disk, so that a power cut after the rename that
    publishes it cannot bring it back with empty or short files."""
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _clean_stale(parent: Path, name: str) -> None:
    """Remove leftovers of earlier interrupted writes of ``name``, if their writer is gone."""
    for stale in parent.glob(f"{TMP_PREFIX}{name}.*"):
        pid = stale.name.rsplit(".", 2)[-2] if stale.name.count(".") >= 2 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier failed attempt
    return pid_exists(pid)


# I/O failures reported by libraries that do not raise OSError (safetensors and tokenizers are
# written in Rust and raise their own errors carrying the OS message)
_IO_MESSAGES = (
    "No space left on device",
    "Read-only file system",
    "Permission denied",
    "Disk quota exceeded",
    "File too large",
    "os error",
)


def _io_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or (isinstance(exc, Exception) and any(m in str(exc) for m in _IO_MESSAGES))


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or str(exc)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prepare_parent(dest: Path) -> Path:
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create output folder {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise OutputWriteError(f"output folder {parent} is not writable")
    _clean_stale(parent, dest.name)
    return parent


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces ``dest`` in one step.

    On any exception the temporary file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    parent = _prepare_parent(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}.{os.getpid()}.", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OutputWriteError) or not _io_error(exc):
            raise
        raise OutputWriteError(f"could not write {dest}: {_reason(exc)}") from exc


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it takes the place of ``dest`` (replacing it whole)."""
    dest = Path(dest)
    parent = _prepare_parent(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}.{os.getpid()}.", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        fsync_tree(tmp)
        old = tmp.with_name(f"{tmp.name}-old")  # this writer's own: a concurrent writer has another
        # one swap at a time: two writers' renames interleaved fail one of them ("Directory not empty")
        with _swap_lock(parent):
            if dest.exists():
                # Two renames: the old version stays complete until the new one is in place.
                os.replace(dest, old)
                os.replace(tmp, dest)
            else:
                os.replace(tmp, dest)
            _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OutputWriteError) or not _io_error(exc):
            raise
        raise OutputWriteError(f"could not write {dest}: {_reason(exc)}") from exc


@contextlib.contextmanager
def _swap_lock(parent: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the destination's folder itself: no lock file is left behind."""
    import fcntl

    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def link_latest(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """``dest`` becomes a hard link to ``src`` in one step (a copy where links cannot be made): a
    stable name for the newest of several versions, which no step of the pipeline reads."""
    src, dest = Path(src), Path(dest)
    with atomic_path(dest) as tmp:
        try:
            tmp.unlink()
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, on_wait=None) -> Iterator[None]:
    """An exclusive lock between processes (``filelock.FileLock``: ``flock`` on ``path`` here); the
    kernel releases it if the holder dies, so a killed run never leaves it stuck. ``on_wait`` is
    called once if it must wait."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def file_semaphore(folder: str | os.PathLike, slots: int, on_wait=None, poll_s: float = 0.2) -> Iterator[int]:
    """At most ``slots`` holders at once between processes: one ``flock`` per slot file in
    ``folder``; yields the slot's number. Released by the kernel when a holder dies, like
    ``file_lock``. ``on_wait`` is called once if every slot is taken."""
    import fcntl
    import time

    if slots < 1:
        raise ValueError(f"a semaphore needs at least one slot, not {slots}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"slot-{i}.lock", "a") for i in range(slots)]
    try:
        waited = False
        while True:
            for i, fh in enumerate(handles):
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield i
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
                return
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(poll_s)
    finally:
        for fh in handles:
            fh.close()
