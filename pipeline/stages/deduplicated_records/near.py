"""Near duplicates of prompts for ``deduplicated_records``: MinHash LSH from datasketch.

A prompt (normalised instruction + input) is compared as the set of its character shingles
(``SHINGLE`` = 2 characters, after lower-casing and dropping everything but letters and digits, so
punctuation and spacing changes are invisible). Two prompts are near duplicates when
:class:`datasketch.MinHashLSH` would return one for the other: at least one of its ``b`` bands of
``r`` MinHash values (chosen by datasketch for ``threshold`` and ``num_perm``) is equal. Groups are
the connected components of that relation.

The MinHash values are datasketch's own (``MinHash`` with its default ``affine32`` permutations and
:func:`shingle_hash` as its ``hashfunc``; a test compares them with ``MinHash.update_batch``), computed
for a whole chunk at once in numpy instead of one ``MinHash`` object per row (27-51 µs a row here,
minutes at ten million rows). ``MinHashLSH`` keeps a Python dict per band, which cannot hold ten
million keys in a few GB, so the bands are matched the way exact dedup matches its keys: each band
as one 64-bit hash a row, sorted.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash, MinHashLSH
from datasketch.minhash import _fmix

SHINGLE = 2  # characters; measured on the real prompts: a one-character edit keeps J 0.86-0.96, distinct prompts stay under 0.47
NUM_PERM = 64  # as good a recall at 0.9 as 128 with these bands (0.92 vs 0.93), at half the cost
SEED = 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # band keys
_BLOCK_SHINGLES = 1 << 15  # shingles per numpy block: 64 permutations x 4 bytes x 32,768 = 8 MB


@lru_cache(maxsize=1)
def _char_tables() -> tuple[np.ndarray, np.ndarray]:
    """For every code point: its lower case (when that is one character) and whether it is a letter
    or digit (``str.isalnum``). Built once a process, about 0.3 s."""
    chars = [chr(c) for c in range(0x110000)]
    lower = np.fromiter((ord(low) if len(low := c.lower()) == 1 else ord(c) for c in chars), np.uint32, len(chars))
    keep = np.fromiter((c.isalnum() for c in chars), bool, len(chars))
    return lower, keep


def shingle_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shingles as their 32-bit hashes, and the number of shingles in each row.

    A text is lower-cased and cut down to its letters and digits (punctuation and spacing changes
    vanish); its shingles are its pairs of neighbouring characters, each hashed as
    :func:`shingle_hash` of ``first << 21 | second``; a one-character text is that character and
    U+0000, which no text keeps."""
    texts = pc.fill_null(texts.cast(pa.large_string()), "")
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    _validity, offsets, data = texts.buffers()  # the rows' UTF-8, back to back
    lo, hi = np.frombuffer(offsets, dtype=np.int64)[[texts.offset, texts.offset + len(texts)]]
    joined = bytes(memoryview(data)[lo:hi]) if data is not None else b""
    cps = np.frombuffer(joined.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
    lower, keep = _char_tables()
    cps = lower[cps]
    kept = keep[cps]
    running = np.concatenate([[0], np.cumsum(kept)])
    ends = np.cumsum(lengths)
    lengths = running[ends] - running[ends - lengths]  # letters and digits a row
    cps = np.append(cps[kept], np.uint32(0))  # a U+0000 after the last, for a one-character last row
    ends = np.cumsum(lengths)
    counts = np.where(lengths >= 2, lengths - 1, lengths)
    hashes = _pair_hash(cps[:-1], cps[1:])
    valid = np.ones(len(hashes), dtype=bool)
    valid[ends[lengths > 0] - 1] = False  # a pair across two rows
    single = ends[lengths == 1] - 1
    hashes[single] = _pair_hash(cps[single], np.zeros(len(single), dtype=np.uint32))
    valid[single] = True
    return hashes[valid], counts


_K1, _K2 = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _pair_hash(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = first * _K1
        h += second * _K2
        return h


def shingle_hash(code) -> int:
    """The 32-bit hash of one shingle code (the ``hashfunc`` datasketch's ``MinHash`` is given;
    datasketch then mixes it with the MurmurHash3 finaliser before its permutations)."""
    code = int(code)
    return int(_pair_hash(np.array([code >> 21], dtype=np.uint32), np.array([code & 0x1FFFFF], dtype=np.uint32))[0])


@lru_cache(maxsize=8)
def permutations(num_perm: int = NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutations ``(a, b)`` for ``num_perm`` and ``seed``."""
    a, b = MinHash(num_perm=num_perm, seed=seed, hashfunc=shingle_hash).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _minhash(hashes: np.ndarray, counts: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """``(num_perm, n)``: each row's minimum of datasketch's permutations of its shingle hashes."""
    a, b = permutations(num_perm, seed)
    a, b = a[:, None], b[:, None]
    hv = _fmix(hashes, 32)
    sig = np.empty((num_perm, len(counts)), dtype=np.uint32)
    sig[:, counts == 0] = np.iinfo(np.uint32).max  # datasketch's empty MinHash
    rows = np.flatnonzero(counts > 0)
    starts = np.concatenate([[0], np.cumsum(counts[rows])])
    work = np.empty((num_perm, _BLOCK_SHINGLES), dtype=np.uint32)
    i = 0
    with np.errstate(over="ignore"):
        while i < len(rows):  # blocks of whole rows, about _BLOCK_SHINGLES shingles each (a cache-sized block is fastest)
            j = min(len(rows), max(i + 1, int(np.searchsorted(starts, starts[i] + _BLOCK_SHINGLES, side="right")) - 1))
            width = int(starts[j] - starts[i])
            block = work[:, :width] if width <= _BLOCK_SHINGLES else np.empty((num_perm, width), dtype=np.uint32)
            np.multiply(a, hv[None, starts[i] : starts[j]], out=block)
            np.add(block, b, out=block)
            sig[:, rows[i:j]] = np.minimum.reduceat(block, starts[i:j] - starts[i], axis=1)
            i = j
    return sig


def signatures(texts: pa.Array, num_perm: int = NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(n, num_perm)`` uint32 MinHash values of each row's shingles (what ``MinHash.update_batch``
    gives for them; a transposed view, so that each permutation's column is contiguous) and a mask
    of the rows that have any shingle."""
    hashes, counts = shingle_hashes(texts)
    return _minhash(hashes, counts, num_perm, seed).T, counts > 0


# datasketch's (false positive, false negative) weights: candidates are checked on their sketches
# afterwards, so the bands are chosen to miss few true pairs (at 0.85 and 64 permutations: 6 bands
# of 10; a pair at J 0.9 is a candidate with probability 0.92, at 0.7 with 0.16)
WEIGHTS = (0.2, 0.8)


@lru_cache(maxsize=8)
def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """``(b, r)``: the bands and rows per band datasketch's ``MinHashLSH`` picks for ``threshold``."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=WEIGHTS)
    return lsh.b, lsh.r


def band_keys(sig: np.ndarray, has: np.ndarray, b: int, r: int) -> np.ndarray:
    """``(n, b)`` uint32: a hash of each band's ``r`` values, never 0; rows without shingles get 0,
    which matches nothing. (32 bits: at ten million rows a band has some thousands of chance
    collisions, which the sketch check rejects like any other candidate.)"""
    keys = np.zeros((len(sig), b), dtype=np.uint32)
    with np.errstate(over="ignore"):
        for band in range(b):
            k = np.full(len(sig), band + 1, dtype=np.uint64)
            for col in sig[:, band * r : (band + 1) * r].T:
                k = _fmix((k ^ col.astype(np.uint64)) * _GOLDEN, 64)
            keys[:, band] = (k >> np.uint64(32)).astype(np.uint32) | np.uint32(1)
    keys[~has] = 0
    return keys


SKETCH = 64  # MinHash values kept a row (8 bits of each: all 64) to check candidate pairs


def sketch(sig: np.ndarray) -> np.ndarray:
    """``(n, SKETCH)`` uint8: what a candidate pair is checked on (b-bit MinHash, b = 8)."""
    return (sig[:, :SKETCH] & 0xFF).astype(np.uint8)


class Sketches:
    """Every row's sketch, added chunk by chunk: in a file when ``path`` is given (memory then holds
    only the candidates' sketches, read back in one sequential pass), else in memory."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._parts: list[np.ndarray] = []
        self._file = open(self.path, "wb") if self.path is not None else None

    def add(self, part: np.ndarray) -> None:
        if self._file is not None:
            self._file.write(np.ascontiguousarray(part, dtype=np.uint8).tobytes())
        else:
            self._parts.append(part)

    def take(self, rows: np.ndarray, block: int = 1 << 20) -> np.ndarray:
        """The sketches of ``rows`` (sorted, distinct)."""
        if self._file is None:
            whole = np.concatenate(self._parts) if self._parts else np.zeros((0, SKETCH), dtype=np.uint8)
            return whole[rows]
        self._file.flush()
        out = np.empty((len(rows), SKETCH), dtype=np.uint8)
        with open(self.path, "rb") as fh:
            start = 0
            while True:
                data = np.frombuffer(fh.read(block * SKETCH), dtype=np.uint8).reshape(-1, SKETCH)
                if not len(data):
                    break
                lo, hi = np.searchsorted(rows, [start, start + len(data)])
                out[lo:hi] = data[rows[lo:hi] - start]
                start += len(data)
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Sketches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def band_pairs(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sharing a key in one band, as pairs of neighbours in (key, row) order, lower row first:
    what ``MinHashLSH.query`` would return for that band, linked in chains (at most one pair a row).
    Key 0 (no shingles) is never shared."""
    # key and row packed in one 64-bit word: one plain sort orders by key, then row
    packed = column.astype(np.uint64) << np.uint64(32)
    packed |= np.arange(len(column), dtype=np.uint64)
    packed.sort()
    keys = (packed >> np.uint64(32)).astype(np.uint32)
    same = np.flatnonzero((keys[1:] == keys[:-1]) & (keys[1:] != 0))
    del keys
    rows = (packed & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return rows[same], rows[same + 1]


def agreeing(a: np.ndarray, b: np.ndarray, sketches: Sketches, threshold: float) -> np.ndarray:
    """Which pairs' sketches agree on at least ``threshold`` of their values, counted as b-bit
    MinHash does (a chance agreement of 1/256 taken out): datasketch's ``jaccard`` estimate."""
    nodes = sorted_unique(np.concatenate([a, b]))
    sk = sketches.take(nodes)
    at = np.zeros(int(nodes[-1]) + 1, dtype=np.int64)  # row → its place in ``nodes`` (a gather beats a search)
    at[nodes] = np.arange(len(nodes))
    ia, ib = at[a], at[b]
    del at
    need = int(np.ceil(SKETCH * (threshold + (1 - threshold) / 256) - 1e-9))
    words = sk.view(np.uint64)  # 8 values a word; equal values are zero bytes of the XOR
    low7 = np.uint64(0x7F7F7F7F7F7F7F7F)
    keep = np.zeros(len(a), dtype=bool)
    step = 1 << 18
    for s in range(0, len(a), step):
        x = words[ia[s : s + step]] ^ words[ib[s : s + step]]
        zero = ~(((x & low7) + low7) | x | low7)  # the high bit of each byte that is zero
        keep[s : s + step] = np.bitwise_count(zero).sum(axis=1, dtype=np.int64) >= need
    return keep


def near_groups(keys: np.ndarray, sketches: Sketches | None = None, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows in a group of two or more, and for each the first row (in order) of its group:
    ``(rows, heads)``, both sorted by row. Pairs sharing a band are linked; with ``sketches``, only
    those whose sketches agree on at least ``threshold`` (checked band by band, so memory holds one
    band's candidates at a time), which keeps prompts that merely share a template from chaining
    into one group. Groups are the connected components (scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges: list[tuple[np.ndarray, np.ndarray]] = []
    for band in range(keys.shape[1] if len(keys) else 0):
        a, b = band_pairs(keys[:, band])
        if sketches is not None and len(a):
            keep = agreeing(a, b, sketches, threshold)
            a, b = a[keep], b[keep]
        if len(a):
            edges.append((a, b))
    if not edges:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    a, b = np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges])
    nodes = sorted_unique(np.concatenate([a, b]))
    m = len(nodes)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))), shape=(m, m))
    count, labels = connected_components(graph, directed=False)
    # nodes are sorted, so a component's first node in ``nodes`` order is its earliest row
    first = np.full(count, m, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(m))
    return nodes, nodes[first[labels]]


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (numpy's hash-based ``unique`` is several times slower on these)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


class _Subset:
    """The sketches of some rows, numbered as those rows."""

    def __init__(self, sketches: Sketches, rows: np.ndarray) -> None:
        self.sketches, self.rows = sketches, rows

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.sketches.take(self.rows[rows])


GROUPS_KEPT_IN_STATS = 1000  # groups listed in the stage's stats (all are counted)


def near_decisions(bands: np.ndarray, sketches: Sketches, prompt: np.ndarray, kept: np.ndarray, where, policy: str,
                   threshold: float) -> tuple[dict[int, str], tuple[np.ndarray, np.ndarray], list[dict], dict]:
    """Near-duplicate groups among the ``kept`` rows and what ``policy`` does with them:
    ``(reasons by rejected row, (grouped rows still kept, their group's first row), groups, counts)``.

    A group counts when its rows hold two or more different prompts (rows with one and the same
    prompt are the conflict policy's business). ``report`` keeps every row; ``drop`` keeps the
    rows with the group's first prompt (the first row in source order) and rejects the rest."""
    kept_rows = np.flatnonzero(kept)
    rows, heads = near_groups(bands[kept_rows], _Subset(sketches, kept_rows), threshold)
    rows, heads = kept_rows[rows], kept_rows[heads]
    differs = np.any(prompt[rows] != prompt[heads], axis=1)
    real = np.isin(heads, np.unique(heads[differs]))  # groups with more than one prompt
    rows, heads, differs = rows[real], heads[real], differs[real]
    reasons: dict[int, str] = {}
    groups: list[dict] = []
    order = np.argsort(heads, kind="stable")  # group by group, rows in order within each
    bounds = np.flatnonzero(np.diff(heads[order])) + 1
    for g, members in enumerate(np.split(rows[order], bounds) if len(rows) else []):
        head = int(members[0])
        if policy == "drop":
            for r, w in zip(members[1:].tolist(), where(members[1:].tolist())):
                if np.any(prompt[r] != prompt[head]):
                    reasons[r] = (f"near duplicate of {where([head])[0]}: their prompts differ only slightly (MinHash LSH on "
                                  f"character bigrams, near_duplicate_threshold {threshold}); near_duplicate_policy drop keeps the first")
        if g < GROUPS_KEPT_IN_STATS:
            sources = where(members[:6].tolist())
            groups.append({"rows": len(members), "kept": sources[0] if policy == "drop" else "all",
                           "sources": sources + ([f"… {len(members) - 6} more"] if len(members) > 6 else []),
                           "prompt": "", "similarity": None, "_head": head, "_members": members[:6].tolist()})
    stay = ~np.isin(rows, list(reasons)) if reasons else np.ones(len(rows), dtype=bool)
    counts = {"near_duplicate_groups": len(bounds) + 1 if len(rows) else 0, "near_duplicate_rows": len(rows),
              "near_duplicates_rejected": len(reasons)}
    return reasons, (rows[stay], heads[stay]), groups, counts


def jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of two prompts' shingle sets (shown next to each group)."""
    def shingles(text: str) -> set[str]:
        t = "".join(c for c in text.lower() if c.isalnum())
        t = t + "\0" if len(t) == 1 else t
        return {t[i : i + 2] for i in range(len(t) - 1)}
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0
