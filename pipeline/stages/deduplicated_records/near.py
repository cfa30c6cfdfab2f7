"""Near duplicates of prompts for ``deduplicated_records``: MinHash LSH from datasketch.

Two prompts are near duplicates when :class:`datasketch.MinHashLSH` would return one for the other
(at least one of its ``b`` bands of ``r`` MinHash values is equal; ``minhash.py`` computes them) and
their MinHash values agree on at least ``threshold`` of them (datasketch's ``jaccard`` estimate,
on 8 bits of each value). Groups are the connected components of that relation.

``MinHashLSH`` keeps a Python dict per band, which cannot hold ten million keys in a few GB, so the
bands are matched the way exact dedup matches its keys: each band as one 32-bit hash a row, sorted;
the sketches wait in a file and each band's candidates' are read back in one sequential pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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
        item = np.dtype(f"V{SKETCH}")  # a row's sketch as one item
        out = np.empty(len(rows), dtype=item)
        buffer = np.empty(block, dtype=item)  # one block read into it at a time
        with open(self.path, "rb") as fh:
            start = 0
            while got := fh.readinto(memoryview(buffer).cast("B")):
                if got % SKETCH:
                    raise RuntimeError(f"{self.path}: a read ended inside a sketch ({got} bytes)")
                data = buffer[: got // SKETCH]
                lo, hi = np.searchsorted(rows, [start, start + len(data)])
                np.take(data, rows[lo:hi] - start, out=out[lo:hi])
                start += len(data)
        return out.view(np.uint8).reshape(-1, SKETCH)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Sketches:
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
    nodes = distinct_rows(a, b)
    sk = sketches.take(nodes)
    at = np.zeros(int(nodes[-1]) + 1, dtype=np.int64)  # row → its place in ``nodes`` (a gather beats a search)
    at[nodes] = np.arange(len(nodes))
    ia, ib = at[a], at[b]
    del at
    need = int(np.ceil(SKETCH * (threshold + (1 - threshold) / 256) - 1e-9))
    whole = (
        np.ascontiguousarray(sk).view(f"V{SKETCH}").ravel()
    )  # a row's sketch as one item: a gather copies it whole (30% faster)
    low7 = np.uint64(0x7F7F7F7F7F7F7F7F)
    keep = np.zeros(len(a), dtype=bool)
    step = 1 << 18
    for s in range(0, len(a), step):
        # 8 values a word; equal values are zero bytes of the XOR
        x = whole[ia[s : s + step]].view(np.uint64).reshape(-1, SKETCH // 8) ^ whole[ib[s : s + step]].view(
            np.uint64
        ).reshape(-1, SKETCH // 8)
        zero = ~(((x & low7) + low7) | x | low7)  # the high bit of each byte that is zero
        keep[s : s + step] = np.bitwise_count(zero).sum(axis=1, dtype=np.int64) >= need
    return keep


def near_groups(
    keys: np.ndarray, sketches: Sketches | None = None, threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
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
    nodes = distinct_rows(a, b)
    m = len(nodes)
    graph = coo_matrix(
        (np.ones(len(a), dtype=np.int8), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))), shape=(m, m)
    )
    count, labels = connected_components(graph, directed=False)
    # nodes are sorted, so a component's first node in ``nodes`` order is its earliest row
    first = np.full(count, m, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(m))
    return nodes, nodes[first[labels]]


def distinct_rows(*parts: np.ndarray) -> np.ndarray:
    """The row numbers (not negative) found in any of ``parts``, sorted and distinct: marked in a
    flag array as long as the highest row, then read off in order (ten million rows, six million
    pairs: 0.05 s, against 1.0 s for sorting the pairs)."""
    parts = tuple(p for p in parts if len(p))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    seen = np.zeros(max(int(p.max()) for p in parts) + 1, dtype=bool)
    for p in parts:
        seen[p] = True
    return np.flatnonzero(seen)


class _Subset:
    """The sketches of some rows, numbered as those rows."""

    def __init__(self, sketches: Sketches, rows: np.ndarray) -> None:
        self.sketches, self.rows = sketches, rows

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.sketches.take(self.rows[rows])


GROUPS_KEPT_IN_STATS = 1000  # groups listed in the stage's stats (all are counted)


def near_decisions(
    bands: np.ndarray, sketches: Sketches, prompt: np.ndarray, kept: np.ndarray, where, policy: str, threshold: float
) -> tuple[dict[int, str], tuple[np.ndarray, np.ndarray], list[dict], dict]:
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
            for r in members[1:].tolist():
                if np.any(prompt[r] != prompt[head]):
                    reasons[r] = (
                        f"near duplicate of {where([head])[0]}: their prompts differ only slightly (MinHash LSH on "
                        f"character bigrams, near_duplicate_threshold {threshold}); near_duplicate_policy drop keeps "
                        "the first"
                    )
        if g < GROUPS_KEPT_IN_STATS:
            sources = where(members[:6].tolist())
            groups.append(
                {
                    "rows": len(members),
                    "kept": sources[0] if policy == "drop" else "all",
                    "sources": sources + ([f"… {len(members) - 6} more"] if len(members) > 6 else []),
                    "prompt": "",
                    "similarity": None,
                    "_head": head,
                    "_members": members[:6].tolist(),
                }
            )
    stay = ~np.isin(rows, list(reasons)) if reasons else np.ones(len(rows), dtype=bool)
    counts = {
        "near_duplicate_groups": len(bounds) + 1 if len(rows) else 0,
        "near_duplicate_rows": len(rows),
        "near_duplicates_rejected": len(reasons),
    }
    return reasons, (rows[stay], heads[stay]), groups, counts


def jaccard(a: str, b: str) -> float:
    """Exact Jaccard similarity of two prompts' shingle sets (shown next to each group)."""

    def shingles(text: str) -> set[str]:
        t = "".join(c for c in text.lower() if c.isalnum())
        t = t + "\0" if len(t) == 1 else t
        return {t[i : i + 2] for i in range(len(t) - 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0
