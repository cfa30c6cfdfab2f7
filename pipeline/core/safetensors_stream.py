"""safetensors files read and written one tensor at a time, never a whole shard in memory.

The format is a little-endian u64 header length, a JSON header (name -> dtype, shape, byte offsets
into the data that follows; an optional ``__metadata__``), then the raw bytes. ``safetensors``'
own ``safe_open`` memory-maps the file, so every page it reads stays in the process's resident
set while the file is open (a merge of a 15 GB base would show 15 GB); ``save_file`` needs every
tensor of the shard at once. Here a tensor is read with ``readinto`` into a fresh buffer and
written the same way, so a process holds about one tensor at a time; a folder's shards follow
Hugging Face's layout (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` with
``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``). Tensors of a few to a few
    tens of MB, freed one after another, stay in glibc's heap between the sizes it returns at once:
    without it, a large merge's RSS grows by about one tensor per layer."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header without ``__metadata__``, byte offset where the data starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """A Hugging Face folder's weight files, in the index's order (or the single file)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        names = json.loads((folder / INDEX).read_text())["weight_map"].values()
        return [folder / n for n in dict.fromkeys(names)]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    return files


class FolderReader:
    """Every tensor of a folder by name, read from disk when asked (no memory map)."""

    def __init__(self, folder: str | os.PathLike):
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for path in weight_files(folder):
            header, start = read_header(path)
            for name, meta in header.items():
                self.entries[name] = (path, meta, start)
        self.bytes_read = 0

    def names(self) -> list[str]:
        return list(self.entries)

    def meta(self, name: str) -> tuple[torch.dtype, list[int]]:
        _, meta, _ = self.entries[name]
        return DTYPES[meta["dtype"]], list(meta["shape"])

    def get(self, name: str) -> torch.Tensor:
        path, meta, start = self.entries[name]
        begin, end = meta["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(memoryview(buffer.numpy())) != end - begin:
                raise OSError(f"{path}: tensor {name} is cut short")
        self.bytes_read += end - begin
        dtype = DTYPES[meta["dtype"]]
        return (buffer.view(dtype) if end > begin else torch.empty(0, dtype=dtype)).reshape(meta["shape"])


@dataclass
class _Planned:
    name: str
    dtype: torch.dtype
    shape: list[int]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def parse_size(size: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"4GiB"`` or a byte count."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, factor in (
        ("GIB", 2**30),
        ("MIB", 2**20),
        ("KIB", 2**10),
        ("GB", 10**9),
        ("MB", 10**6),
        ("KB", 10**3),
        ("B", 1),
    ):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


class FolderWriter:
    """Writes a folder of shards whose tensors (names, dtypes, shapes) are known up front, one
    tensor at a time in the planned order: each shard's header is written when it opens, each
    tensor's bytes when they come."""

    def __init__(
        self,
        folder: str | os.PathLike,
        plan: list[tuple[str, torch.dtype, list[int]]],
        max_shard_size: str | int = "2GB",
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        limit = parse_size(max_shard_size)
        shards: list[list[_Planned]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            item = _Planned(name, dtype, list(shape))
            if shards[-1] and size + item.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += item.nbytes
        n = len(shards)
        self.shards = [
            (SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors", items) for k, items in enumerate(shards)
        ]
        self.order = [item.name for _, items in self.shards for item in items]
        self.total_size = sum(item.nbytes for _, items in self.shards for item in items)
        self._next = 0
        self._file = None
        self._shard = -1
        self._left_in_shard = 0
        self.bytes_written = 0

    def _finish_file(self) -> None:
        if self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _open_next_shard(self) -> None:
        self._finish_file()
        self._shard += 1
        filename, items = self.shards[self._shard]
        header, offset = {}, 0
        for item in items:
            header[item.name] = {
                "dtype": NAMES[item.dtype],
                "shape": item.shape,
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(self.folder / filename, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._left_in_shard = len(items)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next] if self._next < len(self.order) else None
        if name != expected:
            raise ValueError(f"tensor {name!r} written out of order (expected {expected!r})")
        if self._left_in_shard == 0:
            self._open_next_shard()
        _, items = self.shards[self._shard]
        item = items[len(items) - self._left_in_shard]
        if tensor.dtype != item.dtype or list(tensor.shape) != item.shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {item.dtype} {item.shape}"
            )
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self.bytes_written += item.nbytes
        self._left_in_shard -= 1
        self._next += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index when there are several; returns the files."""
        if self._next != len(self.order):
            raise ValueError(f"{len(self.order) - self._next} planned tensors were never written")
        self._finish_file()
        files = [name for name, _ in self.shards]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {item.name: filename for filename, items in self.shards for item in items},
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))
            files.append(INDEX)
        return files
