"""MinHash of prompts for near-duplicate detection: datasketch's values, a chunk at a time.

A prompt is compared as the set of its character bigrams (lower case, letters and digits only).
Its MinHash values are datasketch's own (``MinHash`` with its default ``affine32`` permutations and
:func:`shingle_hash` as its ``hashfunc``; a test compares them with ``MinHash.update_batch``),
computed for a whole chunk at once in numpy instead of one ``MinHash`` object per row (27-51 µs a
row here, minutes at ten million rows). The bands are ``MinHashLSH``'s choice for the threshold.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SHINGLE = 2  # character bigrams: a one-character edit stays near, distinct short prompts stay apart
NUM_PERM = 64  # with these bands, the recall of 128 permutations at half the cost
SEED = 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # band keys
_BLOCK_SHINGLES = 1 << 15  # shingles per numpy block: 64 permutations x 4 bytes x 32,768 = 8 MB


# MurmurHash3's finalizer, as datasketch 2.0 applies it to every hash value before its
# permutations (``datasketch.minhash._fmix``, a private name, copied here so that the values stay
# datasketch's without importing it; a test compares them with ``MinHash.update_batch``).
# From datasketch (https://github.com/ekzhu/datasketch), MIT License, Copyright (c) 2015 ekzhu.
_FMIX_CONSTANTS = {
    32: (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16)),
    64: (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(33), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)),
}


def _fmix(hv, width: int):
    """The MurmurHash3 finalizer, a fixed avalanching bijection on [0, 2^width), element-wise on
    numpy unsigned integer arrays (multiplication wraps around: modulo 2^width)."""
    s1, m1, s2, m2, s3 = _FMIX_CONSTANTS[width]
    hv = hv ^ (hv >> s1)
    hv = hv * m1
    hv = hv ^ (hv >> s2)
    hv = hv * m2
    return hv ^ (hv >> s3)


@lru_cache(maxsize=1)
def _char_tables() -> tuple[np.ndarray, np.ndarray]:
    """For every code point: its lower case (when that is one character) and whether it is a letter
    or digit (``str.isalnum``). Built once a process, about 0.3 s."""
    n = 0x110000  # generators, not a list of 1.1 million strings (about 65 MB more at the peak)
    lower = np.fromiter((ord(low) if len(low := chr(c).lower()) == 1 else c for c in range(n)), np.uint32, n)
    keep = np.fromiter((chr(c).isalnum() for c in range(n)), bool, n)
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
    from datasketch import MinHash  # here, not at the top: it imports scipy (0.7 s at every Dagster process start)

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
        while i < len(
            rows
        ):  # blocks of whole rows, about _BLOCK_SHINGLES shingles each (a cache-sized block is fastest)
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
    from datasketch import MinHashLSH

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
