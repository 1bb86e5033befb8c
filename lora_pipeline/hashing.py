"""Content hashes of files, shared by the artifact store's manifests and the dataset source versions."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 22


def sha256_of_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (weights files are many GiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
