"""Reading a dataset source into a table: local files, folders and globs, fsspec URLs, HF hub datasets.

Dagster-free. Every reader returns rows as a pandas table plus where each row came from, so that
the format checks downstream can name the file and the line or row of a bad value.
"""

from __future__ import annotations

import functools
import glob as globbing
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.hashing import sha256_of_file
from lora_pipeline.ml.data.file_readers import READERS, plain_objects
from lora_pipeline.ml.hub_reach import hub_unreachable

FILE_KINDS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
              ".txt": "txt"}
HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: one slash, not ./ ../ / or ~
# A bare 'data/train.json' that is missing is a typo in a path, not a hub dataset: names ending like files
# are never looked up on the hub (hub names with such an ending are written 'hf:owner/name').
_FILE_SUFFIXES = {*FILE_KINDS, ".tsv", ".arrow", ".yaml", ".yml", ".gz", ".zip", ".xz", ".bz2", ".zst", ".xlsx"}
_GLOB_CHARS = set("*?[")


def looks_like_hub_id(source: str) -> bool:
    """Whether a bare source is a hub dataset's 'owner/name': exactly one slash, no file extension."""
    return bool(_HUB_ID.match(source)) and PurePosixPath(source).suffix.lower() not in _FILE_SUFFIXES


def source_kind(source: str) -> str:
    """'hub', 'remote' (an fsspec URL) or 'local' (a path here, which may be missing): the one rule that
    read_source, source_version and `validate` follow. A bare 'owner/name' is the hub's unless it exists here."""
    source = source.strip()
    if source.startswith(HUB_PREFIX):
        return "hub"
    if "://" in source and not source.startswith("file://"):
        return "remote"
    if looks_like_hub_id(source) and not Path(source).exists():
        return "hub"
    return "local"


def _local_path(source: str) -> str:
    """A local source as a path: file:// dropped, ~ expanded."""
    return os.path.expanduser(source.removeprefix("file://"))


def _local_files(source: str, request: "SourceRequest"):
    """(the local path, its files or "saved" for a save_to_disk folder): missing ones and links out refused."""
    local = _local_path(source)
    files = _expand_local(local)
    if files is None:
        raise _not_found(source, local)
    if isinstance(files, list) and not request.follow_symlinks:
        _refuse_links_out(local, files)
    return local, files


def _not_found(source: str, local: str) -> DataError:
    """'file not found', with where a relative path was looked for: the working directory is the usual surprise."""
    what = "dataset not found (no file matches the pattern)" if _GLOB_CHARS & set(local) else "dataset not found (no such file)"
    return DataError(
        f"{source}: {what} (looked for {Path(local).absolute()}, from the working directory {Path.cwd()}); "
        "fix dataset.source, or write a hub dataset as 'hf:owner/name'"
    )


@dataclass(frozen=True)
class SourcePart:
    """One file's rows in the combined table: rows [start, stop), and for line-based files each row's line."""

    path: str
    kind: str
    start: int
    stop: int
    lines: tuple[int, ...] | None = None

    def where(self, row: int) -> str:
        """'file: line N' or 'file: row N' for a row of the combined table."""
        local = row - self.start
        if self.lines is not None:
            return f"{self.path}: line {self.lines[local]}"
        if self.kind == "jsonl":  # read without blank lines, so row N is line N + 1
            return f"{self.path}: line {local + 1}"
        return f"{self.path}: row {local}"


@dataclass
class SourceRows:
    """A dataset source read into one table, with the origin of every row."""

    frame: pd.DataFrame
    source: str
    kind: str
    parts: list[SourcePart] = field(default_factory=list)

    def where(self, row: int) -> str:
        """The file and line/row of a row of the combined table."""
        for part in self.parts:
            if part.start <= row < part.stop:
                return part.where(row)
        return f"{self.source}: row {row}"


@dataclass(frozen=True)
class SourceRequest:
    """What to read: the source string and the options that apply to hub datasets and column names."""

    source: str
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    max_rows: int | None = None
    follow_symlinks: bool = False  # symlinks that lead out of the source's folder are refused unless this


def read_source(request: SourceRequest) -> SourceRows:
    """Read the source, rename mapped columns and keep at most max_rows rows."""
    source = request.source.strip()
    kind = source_kind(source)
    if kind == "hub":
        rows = _read_hub_dataset(source.removeprefix(HUB_PREFIX), request)
    elif kind == "remote":
        rows = _read_files(source, _expand_remote(source))
    else:
        local, files = _local_files(source, request)
        if files == "saved":
            rows = _read_saved_dataset(local, request)
        else:
            rows = _read_files(source, files)
    rows.frame = _map_columns(rows.frame, request.columns, source)
    if request.max_rows is not None and len(rows.frame) > request.max_rows:
        rows.frame = rows.frame.iloc[: request.max_rows].reset_index(drop=True)
    if rows.frame.empty:
        raise DataError(f"{source}: the dataset has no rows")
    return rows


def _map_columns(frame: pd.DataFrame, columns: dict[str, str], source: str) -> pd.DataFrame:
    if not columns:
        return frame
    missing = [column for column in columns.values() if column not in frame.columns]
    if missing:
        raise DataError(
            f"{source}: dataset.columns maps to {', '.join(repr(c) for c in missing)}, which the data does "
            f"not have (found {', '.join(map(str, frame.columns))})"
        )
    return frame.rename(columns={theirs: ours for ours, theirs in columns.items()})


# --- finding files --------------------------------------------------------------------------------

def _kind_of(path: str) -> str | None:
    suffix = PurePosixPath(path).suffix.lower()
    return FILE_KINDS.get(suffix)


def _only_data_files(paths: Iterable[str], source: str) -> list[str]:
    files = sorted(p for p in paths if _kind_of(p) is not None and not PurePosixPath(p).name.startswith("."))
    if not files:
        raise DataError(
            f"{source}: no dataset files found (looked for {', '.join(sorted(FILE_KINDS))})"
        )
    return files


def _expand_local(path: str) -> list[str] | str | None:
    """Files of a local path, folder or glob; 'saved' for a datasets save_to_disk folder; None if nothing is there."""
    if _GLOB_CHARS & set(path):
        matches = [p for p in globbing.glob(path, recursive=True) if Path(p).is_file()]
        return _only_data_files(matches, path) if matches else None
    target = Path(path)
    if target.is_file():
        if _kind_of(path) is None:
            raise DataError(
                f"{path}: unknown file type {target.suffix or '(no extension)'!r}; use one of "
                f"{', '.join(sorted(FILE_KINDS))}"
            )
        return [path]
    if target.is_dir():
        if (target / "dataset_info.json").exists() or (target / "dataset_dict.json").exists():
            return "saved"
        return _only_data_files((str(p) for p in target.rglob("*") if p.is_file()), path)
    return None


def _refuse_links_out(source: str, files: list[str]) -> None:
    """Refuse a file that is (or lies under) a symlink leading out of the source's folder: a link to
    /etc/passwd in a data folder would otherwise be read as rows. dataset.follow_symlinks allows it."""
    prefix = source.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    base = Path(prefix) if Path(prefix).is_dir() and not prefix.endswith(tuple(FILE_KINDS)) else Path(prefix).parent
    home = Path(base or ".").resolve()
    for name in files:
        target = Path(name).resolve()
        if not target.is_relative_to(home):
            raise DataError(f"{name}: a symlink to {target}, outside the dataset's folder {home}; refused (set "
                            "dataset.follow_symlinks: true to read files that links lead to)")


def _expand_remote(url: str) -> list[str]:
    import fsspec

    try:
        fs, _, paths = fsspec.get_fs_token_paths(url)
    except Exception as exc:  # fsspec raises many types (missing driver, bad URL, credentials)
        raise DataError(f"{url}: cannot open: {exc}") from None
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    try:
        if _GLOB_CHARS & set(url):
            found = list(paths)
        elif fs.isdir(paths[0]):
            found = [p for p in fs.find(paths[0])]
        elif fs.exists(paths[0]):
            found = [paths[0]]
        else:
            raise DataError(f"{url}: dataset not found")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{url}: cannot list: {exc}") from None
    if not found:
        raise DataError(f"{url}: dataset not found")
    files = _only_data_files(found, url)
    return [f"{protocol}://{p}" if "://" not in p else p for p in files]


def _read_files(source: str, files: list[str]) -> SourceRows:
    frames: list[pd.DataFrame] = []
    parts: list[SourcePart] = []
    start = 0
    for path in files:
        kind = _kind_of(path)
        frame, lines = READERS[kind](path)
        parts.append(SourcePart(path, kind, start, start + len(frame), lines))
        start += len(frame)
        frames.append(frame)
    if len(frames) > 1:
        _require_same_columns(frames, files)
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    kinds = sorted({part.kind for part in parts})
    return SourceRows(frame=frame, source=source, kind="+".join(kinds), parts=parts)


def _require_same_columns(frames: list[pd.DataFrame], files: list[str]) -> None:
    first = set(frames[0].columns)
    for frame, path in zip(frames[1:], files[1:]):
        if set(frame.columns) != first and len(frame):
            raise DataError(
                f"{path}: columns {', '.join(map(str, frame.columns))} differ from {files[0]}'s "
                f"({', '.join(map(str, frames[0].columns))}); every file of a dataset needs the same columns"
            )


# --- datasets library -----------------------------------------------------------------------------

def _read_saved_dataset(path: str, request: SourceRequest) -> SourceRows:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(path)
    if isinstance(loaded, DatasetDict):
        if request.split not in loaded:
            raise DataError(f"{path}: no split {request.split!r} (has {', '.join(loaded)}); set dataset.split")
        loaded = loaded[request.split]
    return SourceRows(frame=plain_objects(loaded.to_pandas()), source=path, kind="saved_dataset",
                      parts=[SourcePart(path, "saved_dataset", 0, len(loaded))])


def _read_hub_dataset(name: str, request: SourceRequest) -> SourceRows:
    """A Hugging Face hub dataset: downloaded by datasets, or read from the local HF cache when offline.

    Offline (HF_HUB_OFFLINE=1, or no network), the files of a cached snapshot (from an earlier
    download or `hf download --repo-type dataset`) are loaded, and failing that datasets' own cache.
    """
    import datasets

    label = f"hf:{name}[{request.split}]"
    try:
        loaded = _load_hub_dataset(name, request)
    except Exception as exc:  # network, missing repo, missing split, missing cache: all user-facing
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"hf:{name}: cannot load the hub dataset (split {request.split!r}"
            f"{', subset ' + repr(request.subset) if request.subset else ''}"
            f"{', revision ' + repr(request.revision) if request.revision else ''}): {reason}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[request.split]
    return SourceRows(frame=plain_objects(loaded.to_pandas()), source=label, kind="hub_dataset",
                      parts=[SourcePart(label, "hub_dataset", 0, len(loaded))])


def _load_hub_dataset(name: str, request: SourceRequest):
    import datasets
    from huggingface_hub import constants, snapshot_download

    def cached_snapshot():
        folder = snapshot_download(name, repo_type="dataset", revision=request.revision, local_files_only=True)
        return datasets.load_dataset(folder, request.subset, split=request.split)

    offline = hub_unreachable()
    if offline:
        try:
            return cached_snapshot()
        except Exception:
            pass  # not in the hub cache: datasets' own cache may still have it
        if not constants.HF_HUB_OFFLINE:
            raise DataError(f"offline ({offline}) and not in the local hub cache; download it once where there is a "
                            f"network with `hf download --repo-type dataset {name}`") from None
        try:
            return datasets.load_dataset(name, request.subset, split=request.split, revision=request.revision)
        except Exception:
            # The libraries' own words here are about local_files_only and outgoing traffic: say what to do.
            raise DataError(f"offline (HF_HUB_OFFLINE=1) and not in the local hub or datasets cache; download it "
                            f"once with `hf download --repo-type dataset {name}`, or unset HF_HUB_OFFLINE") from None
    try:
        return datasets.load_dataset(name, request.subset, split=request.split, revision=request.revision)
    except ConnectionError:
        return cached_snapshot()


# --- versions: has the data changed? -------------------------------------------------------------

def source_version(request: SourceRequest) -> str:
    """A short version of the source's content, cheap enough to compute on every sensor tick.

    Local files: sha256 of their bytes. Object stores: each object's ETag (size and modification
    time where there is none), with no download. Hub datasets: the commit of the requested revision
    (offline, the cached snapshot's).
    """
    source = request.source.strip()
    digest = hashlib.sha256()
    kind = source_kind(source)
    if kind == "hub":
        digest.update(_hub_commit(source.removeprefix(HUB_PREFIX), request).encode())
    elif kind == "remote":
        import fsspec

        fs, _, _ = fsspec.get_fs_token_paths(source)
        for path in _expand_remote(source):
            info = fs.info(path)
            token = info.get("ETag") or info.get("etag") or f"{info.get('size')}-{info.get('LastModified') or info.get('mtime')}"
            digest.update(f"{path}\0{token}\0".encode())
    else:
        local, files = _local_files(source, request)
        if files == "saved":
            files = sorted(str(p) for p in Path(local).rglob("*") if p.is_file())
        for path in files:
            digest.update(f"{path}\0{file_sha256(path)}\0".encode())
    return digest.hexdigest()[:16]


# A file written again within the file system's timestamp granularity can keep its size and mtime;
# one modified this recently is hashed again next time instead of trusted.
_SETTLE_SECONDS = 2.0


def file_sha256(path: str) -> str:
    """sha256 of a local file's bytes, memoised in this process on its path, size, mtime and inode.

    Sensors version every model's dataset every few seconds: unchanged files are not read again.
    """
    stat = os.stat(path)
    resolved = str(Path(path).resolve())
    if time.time() - stat.st_mtime < _SETTLE_SECONDS:
        return _hash_file.__wrapped__(resolved, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return _hash_file(resolved, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=1 << 16)  # sequential scans of a folder larger than this would miss every time
def _hash_file(resolved: str, size: int, mtime_ns: int, inode: int) -> str:
    """The hash of the file at `resolved`; the other arguments only key the memo."""
    return sha256_of_file(resolved)


def _hub_commit(name: str, request: SourceRequest) -> str:
    from huggingface_hub import HfApi, snapshot_download

    if not hub_unreachable():
        try:
            return HfApi().dataset_info(name, revision=request.revision).sha
        except Exception:  # no network or no such repo: the cache may know
            pass
    try:
        folder = snapshot_download(name, repo_type="dataset", revision=request.revision, local_files_only=True)
    except Exception as exc:
        raise DataError(f"hf:{name}: cannot find its current revision (no network and not in the hub cache)") from exc
    return Path(folder).name  # snapshot folders are named by commit
