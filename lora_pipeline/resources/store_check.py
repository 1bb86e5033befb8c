"""A whole local store checked at once: what the fault tests end with, and what a person runs after a crash.

Every published version has a manifest whose files match it; every CURRENT.json and run record points
inside the store at a version that checks out; no writer of this machine that is gone left anything
(staging folders, .partial files, version folders without a manifest).
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_pipeline.resources.artifacts import (
    MANIFEST,
    POINTER,
    RECORDS,
    ArtifactIntegrityError,
    ArtifactRef,
    left_by_dead_writer,
    manifest_digest,
)


def store_problems(store) -> list[str]:
    """Every problem of a local ArtifactStore, one sentence each (none: the store is consistent)."""
    root = Path(store.root).resolve()
    problems: list[str] = []
    if not root.is_dir():
        return problems
    for pointer in sorted(root.glob(f"*/*/{POINTER}")):
        problems += _pointer_problems(store, pointer, root)
    for record in sorted((root / RECORDS / "runs").glob("*/*/*.json")):  # a finished run's: only never outside
        ref = ArtifactRef.from_json(record.read_text())
        if not store.inside(ref.uri):
            problems.append(f"{record}: points outside the store ({ref.uri})")
    versions = [path for path in root.glob("*/*/*") if path.is_dir() and not path.name.startswith(".")
                and not path.relative_to(root).parts[0].startswith((".", "_"))]  # not .staging, .locks, _records
    for manifest_dir in sorted(versions):
        if not (manifest_dir / MANIFEST).exists():
            problems.append(f"{manifest_dir}: a version folder without {MANIFEST} (a half-published leftover)")
            continue
        manifest = json.loads((manifest_dir / MANIFEST).read_text())
        ref = ArtifactRef(uri=str(manifest_dir), sha256=manifest_digest(manifest), size_bytes=0, files=0)
        try:
            store.verify(manifest_dir, ref, rehash=True)  # a check reads every byte, even if read before
        except ArtifactIntegrityError as exc:
            problems.append(str(exc))
    for leftover in sorted(root.rglob("*.partial-*")):
        if left_by_dead_writer(leftover.name.rsplit(".partial-", 1)[1]):
            problems.append(f"{leftover}: left by a writer that is gone")
    staging = root / ".staging"
    if staging.is_dir():
        problems += [f"{entry}: a staging folder of a writer that is gone" for entry in sorted(staging.iterdir())
                     if left_by_dead_writer(entry.name)]
    return problems


def _pointer_problems(store, pointer: Path, root: Path) -> list[str]:
    try:
        ref = ArtifactRef.from_json(pointer.read_text())
    except (ValueError, KeyError) as exc:
        return [f"{pointer}: not a pointer ({exc})"]
    if not store.inside(ref.uri):
        return [f"{pointer}: points outside the store ({ref.uri})"]
    try:
        store.local_path(ref)
    except ArtifactIntegrityError as exc:
        return [f"{pointer}: {exc}"]
    return []
