"""What an artifact is, wherever it is stored: its pointer (ArtifactRef), its manifest, its file names.

A manifest lists every file with its size and sha256; an artifact's version is a hash of it. The
store (storage.py) publishes, finds and verifies artifacts with these.
"""

import hashlib
import json
import os
import re
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_pipeline.errors import LoraPipelineError
from lora_pipeline.hashing import sha256_of_file

MANIFEST = "MANIFEST.json"
POINTER = "CURRENT.json"
CARD = "README.md"
CARD_HISTORY = "CARD.json"
LINEAGE = "LINEAGE.json"
# What an artifact says about itself (who made it, when, how it scored), not what it holds.
ABOUT_FILES = (LINEAGE, CARD)
INPUTS = "INPUTS.json"
RECORDS = "_records"


class ArtifactIntegrityError(LoraPipelineError):
    """An artifact is missing its manifest or its files do not match it."""


@dataclass(frozen=True)
class ArtifactRef:
    """A pointer to a published artifact: what assets pass to each other instead of weights."""

    uri: str
    sha256: str
    size_bytes: int
    files: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, payload: str) -> "ArtifactRef":
        """The ref in a pointer's JSON (which may say more, e.g. the order of the run that wrote it)."""
        data = json.loads(payload)
        return cls(uri=data["uri"], sha256=data["sha256"], size_bytes=data["size_bytes"], files=data["files"])

    @classmethod
    def from_entry(cls, entry: dict) -> "ArtifactRef":
        """The ref a lineage parent or a champion record names ({"uri", "sha256", ...}); size and count unknown there."""
        return cls(uri=entry["uri"], sha256=entry["sha256"], size_bytes=entry.get("size_bytes", 0),
                   files=entry.get("files", 0))


def writer_tag() -> str:
    """A name for a writer's work in progress: this machine, this process and a random part, so that what a
    killed writer leaves can be told from what a live one is writing (left_by_dead_writer)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def left_by_dead_writer(tag: str) -> bool:
    """Whether a writer_tag names a process of this machine that is gone (False for other machines' and old names)."""
    from lora_pipeline.resources.locks import process_alive

    writer = tag.rpartition("-")[0]
    host, _, pid = writer.rpartition("-")
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def replace_file(path: Path, payload: bytes) -> None:
    """Write a local file whole or not at all (readers see the old content or the new, never a mix); a write
    that fails (a full disk) leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{path}.partial-{writer_tag()}")
    try:
        partial.write_bytes(payload)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def accepted_cards(local: Path) -> set[tuple[int, str]]:
    """(size, sha256) of every model card an artifact has had since publishing, from its CARD.json."""
    path = local / CARD_HISTORY
    if not path.exists():
        return set()
    return {(card["size"], card["sha256"]) for card in json.loads(path.read_text(encoding="utf-8"))["cards"]}


VERSION_PATTERN = re.compile(r"^[0-9a-f]{16}$")
SEGMENT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def plain_segment(name: str, what: str) -> str:
    """A path segment under the store root: refuse anything that could point outside it."""
    if not SEGMENT_PATTERN.fullmatch(name) or ".." in name:
        raise ArtifactIntegrityError(f"{what} {name!r} is not a plain name; refusing a path outside the store")
    return name


def build_manifest(local_dir: Path) -> dict:
    """Every file under local_dir with its size and sha256, sorted by path."""
    files = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files.append(
            {"path": path.relative_to(local_dir).as_posix(), "size": path.stat().st_size, "sha256": sha256_of_file(path)}
        )
    return {"format": 1, "files": files}


def upload_manifest_last(fs, local_dir: Path, target: str, manifest: dict) -> None:
    """Upload a folder's files to an object-store prefix, the manifest last: only then does it count."""
    for entry in manifest["files"]:
        fs.put_file(str(local_dir / entry["path"]), f"{target}/{entry['path']}")
    fs.pipe_file(f"{target}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())


def manifest_digest(manifest: dict) -> str:
    """An artifact's identity: the sha256 of its manifest (its version is the first 16 hex digits)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
