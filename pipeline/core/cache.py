"""Keyed cache folders, the one pattern behind every reusable output (tokenized data, adapters,
evaluations, merged models): the output of a key lives in ``<root>/<key[:16]>/``, is written whole
(``pipeline.core.atomic.atomic_dir``: a failure leaves nothing a later step would read) and is
reused when its completion markers are all there."""

from __future__ import annotations

import os
from pathlib import Path

KEY_CHARS = 16  # a 64-bit prefix of the sha256: folders stay short, collisions stay out of reach


def keyed_folder(root: str | os.PathLike, key: str) -> Path:
    """Where the output of ``key`` lives under ``root``."""
    return Path(root) / key[:KEY_CHARS]


def is_complete(folder: str | os.PathLike, *markers: str) -> bool:
    """Whether a cached output can be reused: every marker file is there (written last, or
    published with the folder in one rename)."""
    return all((Path(folder) / m).is_file() for m in markers)
