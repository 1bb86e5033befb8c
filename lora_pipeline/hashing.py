"""Content hashes of files, shared by the artifact store's manifests and the dataset source versions."""

from __future__ import annotations

import functools
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


# Files up to this size are hashed by content; larger ones (weight shards) by name, size and modification time,
# which a download or a save always changes, so reading a folder's version never reads gigabytes.
FOLDER_CONTENT_LIMIT = 64 * 1024 * 1024


def folder_fingerprint(folder: str | Path) -> str:
    """A version of a local model folder: every file's relative path with its content hash (or, for a large
    file, its size and modification time). Memoised on the files' sizes and times, as settings are read often."""
    folder = Path(folder)
    stats = tuple(sorted((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns)
                         for path in folder.rglob("*") if path.is_file() and (stat := path.stat())))
    return _fingerprint(str(folder), stats)


@functools.lru_cache(maxsize=64)
def _fingerprint(folder: str, stats: tuple) -> str:
    digest = hashlib.sha256()
    for name, size, mtime in stats:
        part = sha256_of_file(Path(folder) / name) if size <= FOLDER_CONTENT_LIMIT else f"{size}:{mtime}"
        digest.update(f"{name}\0{part}\n".encode())
    return digest.hexdigest()[:16]
