"""The artifact store: datasets and model folders at deterministic URIs, published atomically.

Layout under the store's root:
    <partition>/<asset>/<version>/...       an immutable artifact; MANIFEST.json is written last
    <partition>/<asset>/<version>/CARD.json model cards an older lora-pipeline amended after publishing
                                            (still accepted when verifying; published artifacts no longer change)
    <partition>/<asset>/CURRENT.json        pointer to the newest published version (ArtifactRef)
    <partition>/<asset>/.by-inputs/<key>.json  the artifact made from given inputs (reused on retries)
    <partition>/<asset>/.checkpoints/<key>/ training checkpoints of one set of inputs (INPUTS.json, step-N/)
    .locks/<partition>/<asset>.lock         held by the one run writing the asset partition (locks.py)
    .staging/<uuid>/                        work in progress of a local store; never read
    _records/scores/<suite>/<weights>.parquet  per-example scores of some weights on an eval suite (a cache)
    _records/champions/<model>/<n>.json     a model's champion history, one file per event (append-only)
    _records/runs/<run id>/<partition>/<asset>.json  what one run made or read of an asset partition: the
                                            ref every stage of that run reads (a run reads what it made);
                                            dropped after RUN_RECORD_DAYS on a local store
store_check.py checks a whole local store at once.
A version is the first 16 hex digits of the manifest's sha256, so publishing identical content
twice yields the same artifact. A version folder counts as published only once its MANIFEST.json
exists, and readers check every file against it (size and sha256): on a local store the folder
appears by an atomic rename; on an object store (S3 has no rename) the files are uploaded to the
version's prefix first and the manifest last, so a writer killed mid-upload leaves files that
nothing reads and the next publish of the same content overwrites.
"""

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import dagster as dg
import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import Field

from lora_pipeline.hashing import sha256_of_file
from lora_pipeline.resources.artifacts import (
    ABOUT_FILES,
    accepted_cards,
    ArtifactIntegrityError,
    ArtifactRef,
    build_manifest,
    CARD,
    INPUTS,
    left_by_dead_writer,
    MANIFEST,
    manifest_digest,
    plain_segment,
    POINTER,
    RECORDS,
    replace_file,
    upload_manifest_last,
    VERSION_PATTERN,
    writer_tag,
)
from lora_pipeline.resources.locks import local_writer_lock, s3_writer_lock

# Folders whose files were hashed against their manifest in this process.
_HASHED: set[tuple[str, str]] = set()
STALE_STAGING_SECONDS = 24 * 3600
RUN_RECORD_DAYS = 7


def _remove_stale(staging_parent: Path) -> None:
    """Remove staging folders left by writers that were killed: at once when the writer was a process of this
    machine that is gone, else once older than a day (a writer on another machine may still be at work)."""
    cutoff = time.time() - STALE_STAGING_SECONDS
    for entry in staging_parent.iterdir():
        try:
            if left_by_dead_writer(entry.name) or entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            pass  # another writer removed it first


def _newest_write(fs, folder: str) -> float:
    """When anything in a folder was last written (epoch seconds; 0 for an empty one), local or object store."""
    newest = 0.0
    for info in fs.find(folder, detail=True).values():
        stamp = info.get("LastModified") or info.get("mtime")
        if stamp is not None:
            newest = max(newest, stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp))
    return newest


class ArtifactStore(dg.ConfigurableResource):
    """Where artifacts live: a local folder or any fsspec URL (s3://bucket/prefix through s3fs)."""

    root: str = Field(
        default="artifacts",
        description="Root folder or URL of the store. Relative paths are resolved against the "
        "working directory; s3://bucket/prefix uses s3fs with the standard AWS variables.",
    )
    cache_dir: str = Field(
        default=".cache/lora_pipeline/artifacts",
        description="Local folder where artifacts of a remote store are downloaded for reading.",
    )
    # Credentials for an s3:// root. Deployments set them with dg.EnvVar (the UI then shows the
    # variable's name, never its value); left unset, s3fs finds them itself (AWS variables,
    # ~/.aws, instance roles). Never shown in a repr.
    aws_access_key_id: Optional[str] = Field(
        default=None, repr=False, description="S3 access key id (from dg.EnvVar('AWS_ACCESS_KEY_ID'))."
    )
    aws_secret_access_key: Optional[str] = Field(
        default=None, repr=False, description="S3 secret key (from dg.EnvVar('AWS_SECRET_ACCESS_KEY'))."
    )
    aws_session_token: Optional[str] = Field(
        default=None, repr=False, description="S3 session token (from dg.EnvVar('AWS_SESSION_TOKEN'))."
    )
    endpoint_url: Optional[str] = Field(
        default=None,
        description="S3-compatible server such as MinIO (from dg.EnvVar('AWS_ENDPOINT_URL')); unset: AWS.",
    )

    def _storage_options(self) -> dict:
        if not self.root.startswith(("s3://", "s3a://")):
            return {}
        given = {"key": self.aws_access_key_id, "secret": self.aws_secret_access_key,
                 "token": self.aws_session_token, "endpoint_url": self.endpoint_url}
        # Outside a run (the CLI reading the store between runs) fields given as dg.EnvVar are not resolved yet.
        resolved = {name: value.get_value() if isinstance(value, dg.EnvVar) else value for name, value in given.items()}
        return {name: value for name, value in resolved.items() if value}

    def _fs_and_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = fsspec.core.url_to_fs(self.root, **self._storage_options())
        if isinstance(fs, LocalFileSystem):
            path = str(Path(path).resolve())
        return fs, path.rstrip("/")

    @property
    def is_local(self) -> bool:
        """Whether the store is a folder on this machine (publishing is then a rename)."""
        return isinstance(self._fs_and_root()[0], LocalFileSystem)

    def _ref_for(self, path: str, manifest: dict) -> ArtifactRef:
        """The reference to the folder at path holding the files of manifest."""
        return ArtifactRef(
            uri=self._uri(path),
            sha256=manifest_digest(manifest),
            size_bytes=sum(entry["size"] for entry in manifest["files"]),
            files=len(manifest["files"]),
        )

    def _uri(self, path: str) -> str:
        fs, _ = self._fs_and_root()
        return path if self.is_local else fs.unstrip_protocol(path)

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A fresh local folder to write an artifact into; removed afterwards unless published.

        For a local store it lies under the store's root, so publishing is a rename, not a copy.
        """
        if self.is_local:
            _, root = self._fs_and_root()
            staging_parent = Path(root) / ".staging"
            staging_parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(staging_parent)
            path = staging_parent / writer_tag()
            path.mkdir()
        else:
            path = Path(tempfile.mkdtemp(prefix="lora-pipeline-staging-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def writer_lock(self, partition: str, asset: str, run_id: str) -> contextlib.AbstractContextManager:
        """Be the only run writing an asset partition, or raise ConcurrentWriteError naming the one that is.

        Locks work on local stores and S3 (and S3-compatible servers with conditional writes);
        other object stores are not locked.
        """
        fs, root = self._fs_and_root()
        path = f"{root}/.locks/{plain_segment(partition, 'model')}/{plain_segment(asset, 'asset')}.lock"
        what = f"{asset} of model {partition!r}"
        if self.is_local:
            return local_writer_lock(Path(path), what, run_id)
        if "s3" in fs.protocol:
            return s3_writer_lock(fs, path, what, run_id)
        return contextlib.nullcontext()

    def publish(self, local_dir: Path, partition: str, asset: str, run_order: float | None = None) -> ArtifactRef:
        """Publish a finished folder as an immutable artifact and point CURRENT.json at it (unless a run launched
        later has pointed it already: see point_current)."""
        fs, root = self._fs_and_root()
        manifest = build_manifest(local_dir)
        digest = manifest_digest(manifest)
        target = f"{root}/{plain_segment(partition, 'model')}/{plain_segment(asset, 'asset')}/{digest[:16]}"
        if not fs.exists(f"{target}/{MANIFEST}"):
            (local_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if self.is_local:
                if Path(target).exists():  # a half-published leftover without a manifest
                    shutil.rmtree(target)
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                local_dir.rename(target)
            else:
                self._remove_abandoned_uploads(self._asset_dir(partition, asset))
                upload_manifest_last(fs, local_dir, target, manifest)
        ref = self._ref_for(target, manifest)
        self.point_current(partition, asset, ref, run_order)
        return ref

    def _remove_abandoned_uploads(self, asset_dir: str) -> None:
        """Remove version prefixes without a manifest and untouched for a day: uploads of killed writers."""
        fs, _ = self._fs_and_root()
        cutoff = time.time() - STALE_STAGING_SECONDS
        fs.invalidate_cache(asset_dir)
        try:
            entries = fs.ls(asset_dir, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if not VERSION_PATTERN.fullmatch(entry.rstrip("/").split("/")[-1]) or fs.exists(f"{entry}/{MANIFEST}"):
                continue
            if _newest_write(fs, entry) < cutoff:
                fs.rm(entry, recursive=True)

    def point_current(self, partition: str, asset: str, ref: ArtifactRef, run_order: float | None = None) -> bool:
        """Make ref the asset partition's current artifact (what downstream stages read); False when it stays.

        run_order (when the writing run was launched) moves pointers forward only, in run order: a run
        launched earlier that publishes after a later one has leaves the later one's version current. The
        stage's writer lock serialises the read and the write for one asset partition."""
        path = f"{self._asset_dir(partition, asset)}/{POINTER}"
        existing = self._get_small(path)
        if existing is not None and ArtifactRef.from_json(existing.decode()) == ref:
            return True  # already current: a retry rewrites nothing
        if run_order is not None and existing is not None:
            newer = json.loads(existing).get("run_order")
            if newer is not None and newer > run_order:
                return False
        data = json.loads(ref.to_json())
        if run_order is not None:
            data["run_order"] = run_order
        self._put_small(path, json.dumps(data, sort_keys=True).encode())
        return True

    def _asset_dir(self, partition: str, asset: str) -> str:
        _, root = self._fs_and_root()
        return f"{root}/{plain_segment(partition, 'model')}/{plain_segment(asset, 'asset')}"

    def _put_small(self, path: str, payload: bytes) -> None:
        """Write a small file whole or not at all, and not at all when it already says this (retries rewrite nothing)."""
        fs, _ = self._fs_and_root()
        if self._get_small(path) == payload:
            return
        if self.is_local:
            for leftover in Path(path).parent.glob(f"{Path(path).name}.partial-*"):  # of writers killed mid-write
                if left_by_dead_writer(leftover.name.rsplit(".partial-", 1)[1]):
                    leftover.unlink(missing_ok=True)
            replace_file(Path(path), payload)
        else:
            fs.pipe_file(path, payload)  # an object store PUT is atomic

    def _get_small(self, path: str) -> bytes | None:
        fs, _ = self._fs_and_root()
        fs.invalidate_cache(path)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    def remember(self, partition: str, asset: str, inputs_key: str, ref: ArtifactRef) -> None:
        """Record that ref was made from the inputs with this key."""
        self._put_small(f"{self._asset_dir(partition, asset)}/.by-inputs/{plain_segment(inputs_key, 'inputs key')}.json",
                        ref.to_json().encode())

    def remembered(self, partition: str, asset: str, inputs_key: str) -> ArtifactRef | None:
        """The artifact made from the inputs with this key, if one was published and still matches its manifest."""
        payload = self._get_small(
            f"{self._asset_dir(partition, asset)}/.by-inputs/{plain_segment(inputs_key, 'inputs key')}.json"
        )
        if payload is None:
            return None
        ref = ArtifactRef.from_json(payload.decode())
        try:
            self.local_path(ref)
        except (ArtifactIntegrityError, FileNotFoundError):
            return None  # removed or damaged since: make it again
        return ref

    def current(self, partition: str, asset: str) -> ArtifactRef:
        """The newest published artifact of an asset partition."""
        payload = self._get_small(f"{self._asset_dir(partition, asset)}/{POINTER}")
        if payload is None:
            raise ArtifactIntegrityError(
                f"{asset} has no published artifact for model {partition!r} in {self.root}; materialize it first"
            )
        return ArtifactRef.from_json(payload.decode())

    def inside(self, uri: str) -> bool:
        """Whether a URI lies inside the store's root (after resolving '..' and links, for a local store)."""
        _, root = self._fs_and_root()
        if self.is_local:
            return Path(uri).resolve().is_relative_to(Path(root).resolve())
        path = fsspec.core.strip_protocol(uri)
        return path.startswith(root.rstrip("/") + "/") and "/../" not in path + "/"

    def local_path(self, ref: ArtifactRef) -> Path:
        """A local folder with the artifact's files, verified against its manifest; a ref that points outside
        the store's root (a forged pointer or record, a copied store's pointer to the original) is refused."""
        if not self.inside(ref.uri):
            raise ArtifactIntegrityError(f"{ref.uri} is outside the store {self.root}; refusing a pointer that "
                                         "leaves it (a copied store needs its pointers made again)")
        fs, _ = self._fs_and_root()
        if self.is_local:
            local = Path(ref.uri)
        else:
            local = Path(self.cache_dir).resolve() / ref.sha256[:16]
            if not (local / MANIFEST).exists():
                partial = local.with_name(local.name + f".partial-{uuid.uuid4().hex[:8]}")
                try:
                    fs.get(ref.uri.rstrip("/") + "/", str(partial), recursive=True)
                    self.verify(partial, ref)  # before it enters the cache
                    partial.rename(local)
                finally:
                    shutil.rmtree(partial, ignore_errors=True)
        self.verify(local, ref)
        return local

    def verify(self, local: Path, ref: ArtifactRef, rehash: bool = False) -> None:
        """Check every file's size and sha256 against the manifest, and the manifest against the reference.

        A folder is hashed once per process (a version never changes once published), unless rehash;
        sizes are checked on every read.
        """
        manifest_path = local / MANIFEST
        if not manifest_path.exists():
            raise ArtifactIntegrityError(f"{ref.uri}: no {MANIFEST}; the artifact was never fully published")
        manifest = json.loads(manifest_path.read_text())
        if manifest_digest(manifest) != ref.sha256:
            raise ArtifactIntegrityError(f"{ref.uri}: {MANIFEST} does not match the reference's sha256")
        inside = local.resolve()
        amended_cards = accepted_cards(local)
        accepted = {
            entry["path"]: {(entry["size"], entry["sha256"])} | (amended_cards if entry["path"] == CARD else set())
            for entry in manifest["files"]
        }
        for entry in manifest["files"]:
            path = local / entry["path"]
            if not path.resolve().is_relative_to(inside):
                raise ArtifactIntegrityError(f"{ref.uri}: {MANIFEST} names {entry['path']!r}, outside the artifact")
            if not path.exists() or path.stat().st_size not in {size for size, _ in accepted[entry["path"]]}:
                raise ArtifactIntegrityError(f"{ref.uri}: file {entry['path']} is missing or has the wrong size")
        key = (str(local.resolve()), ref.sha256)
        if key in _HASHED and not rehash:
            return
        for entry in manifest["files"]:
            if sha256_of_file(local / entry["path"]) not in {digest for _, digest in accepted[entry["path"]]}:
                raise ArtifactIntegrityError(
                    f"{ref.uri}: file {entry['path']} does not match its sha256 in {MANIFEST} (corrupted)"
                )
        _HASHED.add(key)

    def content_digest(self, ref: ArtifactRef, only: tuple[str, ...] = ()) -> str:
        """sha256 of what an artifact holds: its manifest without the lineage and the model card, or
        with only the files named.

        Two runs that made the same bytes have the same content digest, though their lineage
        (run id, start time) makes their versions differ.
        """
        manifest = json.loads((self.local_path(ref) / MANIFEST).read_text())
        entries = [entry for entry in manifest["files"]
                   if (entry["path"] in only if only else entry["path"] not in ABOUT_FILES)]
        missing = set(only) - {entry["path"] for entry in entries}
        if missing:
            raise ArtifactIntegrityError(f"{ref.uri}: has no {', '.join(sorted(missing))}")
        return manifest_digest({"files": entries})

    # --- small records: <root>/_records/<kind>/..., e.g. cached scores and champion histories ---

    def put_record(self, relative: str, payload: bytes) -> None:
        """Write a small record file (whole or not at all) at _records/<relative>."""
        self._put_small(self._record_path(relative), payload)

    def get_record(self, relative: str) -> bytes | None:
        """A small record file's bytes, or None when there is none."""
        return self._get_small(self._record_path(relative))

    def list_records(self, relative_dir: str) -> list[str]:
        """The names of the record files in a folder of _records, sorted (none when it does not exist)."""
        fs, _ = self._fs_and_root()
        folder = self._record_path(relative_dir)
        fs.invalidate_cache(folder)
        try:
            return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []

    # --- what a run made or read: its stages read these, never "whatever is current now" ---

    def record_run_ref(self, run_id: str, partition: str, asset: str, ref: ArtifactRef) -> None:
        """The artifact this run made of the asset partition: what this run's later stages read.

        A local store drops other runs' records untouched for RUN_RECORD_DAYS (runs that long are over);
        on an object store, a lifecycle rule on _records/runs/ does the same."""
        self.put_record(self._run_ref_path(run_id, partition, asset), ref.to_json().encode())
        if self.is_local:
            runs = Path(self._record_path("runs"))
            cutoff = time.time() - RUN_RECORD_DAYS * 86400
            for folder in runs.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if folder.name != run_id and folder.stat().st_mtime < cutoff:
                        shutil.rmtree(folder, ignore_errors=True)

    def run_ref(self, run_id: str, partition: str, asset: str) -> ArtifactRef:
        """The asset partition as this run has it: what the run made, else the current artifact, pinned for the
        rest of the run at its first read (so two stages of one run never read two versions of a parent)."""
        relative = self._run_ref_path(run_id, partition, asset)
        payload = self.get_record(relative)
        if payload is None:
            self.put_record(relative, self.current(partition, asset).to_json().encode())
            payload = self.get_record(relative)
        return ArtifactRef.from_json(payload.decode())

    def _run_ref_path(self, run_id: str, partition: str, asset: str) -> str:
        return f"runs/{plain_segment(run_id, 'run id')}/{plain_segment(partition, 'model')}/{plain_segment(asset, 'asset')}.json"

    def _record_path(self, relative: str) -> str:
        _, root = self._fs_and_root()
        return "/".join([root, RECORDS, *(plain_segment(part, "record path") for part in relative.split("/"))])

    # --- training checkpoints: <partition>/<asset>/.checkpoints/<run_key>/step-<N>/, manifest last ---

    def _checkpoints_dir(self, partition: str, asset: str) -> str:
        return f"{self._asset_dir(partition, asset)}/.checkpoints"

    def record_checkpoint_inputs(self, partition: str, asset: str, run_key: str, inputs: dict) -> None:
        """Keep what a run's checkpoints were made from, so a later run can say what changed."""
        path = f"{self._checkpoints_dir(partition, asset)}/{plain_segment(run_key, 'run key')}/{INPUTS}"
        self._put_small(path, json.dumps(inputs, indent=1, sort_keys=True).encode())

    def checkpoint_inputs(self, partition: str, asset: str, run_key: str) -> dict | None:
        """What a run's checkpoints were made from (None when not recorded)."""
        payload = self._get_small(f"{self._checkpoints_dir(partition, asset)}/{plain_segment(run_key, 'run key')}/{INPUTS}")
        return json.loads(payload) if payload is not None else None

    def publish_checkpoint(self, folder: Path, partition: str, asset: str, run_key: str, step: int,
                           keep: int = 2) -> str:
        """Publish a training checkpoint folder (manifest last) and drop all but the newest `keep` of its run."""
        fs, _ = self._fs_and_root()
        base = f"{self._checkpoints_dir(partition, asset)}/{plain_segment(run_key, 'run key')}"
        target = f"{base}/step-{step:09d}"
        manifest = build_manifest(folder)
        if self.is_local:
            partial = Path(f"{target}.partial-{uuid.uuid4().hex[:8]}")
            shutil.copytree(folder, partial)
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        else:
            upload_manifest_last(fs, folder, target, manifest)
        for old in self._complete_checkpoints(base)[keep:]:
            fs.rm(old, recursive=True)
        return self._uri(target)

    def _complete_checkpoints(self, base: str) -> list[str]:
        """Checkpoint folders of a run that have a manifest, newest first."""
        fs, _ = self._fs_and_root()
        if not fs.exists(base):
            return []
        fs.invalidate_cache(base)
        folders = [entry for entry in fs.ls(base, detail=False) if entry.rstrip("/").split("/")[-1].startswith("step-")
                   and ".partial-" not in entry]
        complete = [folder for folder in folders if fs.exists(f"{folder}/{MANIFEST}")]
        return sorted(complete, key=lambda folder: folder.rstrip("/").split("/")[-1], reverse=True)

    def latest_checkpoint(self, partition: str, asset: str, run_key: str) -> tuple[int, Path] | None:
        """The newest checkpoint of a run whose files match its manifest, as (step, local folder)."""
        fs, _ = self._fs_and_root()
        for folder in self._complete_checkpoints(f"{self._checkpoints_dir(partition, asset)}/{run_key}"):
            manifest = json.loads(fs.cat_file(f"{folder}/{MANIFEST}").decode())
            try:
                local = self.local_path(self._ref_for(folder, manifest))
            except ArtifactIntegrityError:
                continue  # damaged: fall back to the one before
            return int(folder.rstrip("/").split("step-")[-1]), local
        return None

    def checkpoint_runs(self, partition: str, asset: str) -> list[str]:
        """The run keys that have checkpoints for an asset partition."""
        fs, _ = self._fs_and_root()
        base = self._checkpoints_dir(partition, asset)
        if not fs.exists(base):
            return []
        return sorted(entry.rstrip("/").split("/")[-1] for entry in fs.ls(base, detail=False))

    def drop_checkpoints(self, partition: str, asset: str, run_key: str) -> list[str]:
        """Remove the checkpoints of run_key, whose artifact is published (they are superseded), and those of other
        runs that have written nothing for a day (abandoned); return the run keys removed.

        Another run's recent checkpoints stay: a run of the same model with other inputs (two people, or a
        schedule beside a person) may be training or about to resume from them.
        """
        fs, _ = self._fs_and_root()
        base = self._checkpoints_dir(partition, asset)
        cutoff = time.time() - STALE_STAGING_SECONDS
        dropped = []
        for other in self.checkpoint_runs(partition, asset):
            folder = f"{base}/{other}"
            if other == run_key or _newest_write(fs, folder) < cutoff:
                try:
                    fs.rm(folder, recursive=True)
                except FileNotFoundError:
                    continue  # another run's publish dropped these abandoned ones first
                dropped.append(other)
        return dropped


class ArtifactRefIOManager(dg.ConfigurableIOManager):
    """Passes ArtifactRef pointers between assets; the data itself stays in the artifact store."""

    store: ArtifactStore

    def handle_output(self, context: dg.OutputContext, obj: ArtifactRef) -> None:
        if not isinstance(obj, ArtifactRef):
            raise TypeError(f"{context.asset_key.to_user_string()} must return an ArtifactRef, got {type(obj).__name__}")
        self.store.record_run_ref(context.run_id, context.asset_partition_key, context.asset_key.path[-1], obj)

    def load_input(self, context: dg.InputContext) -> ArtifactRef:
        # The parent as this run made it, or as the run first read it: another run of the same model may move
        # CURRENT.json between two of this run's steps.
        asset, partition = context.asset_key.path[-1], context.asset_partition_key
        try:
            run_id = context.step_context.run_id
        except Exception:  # an input loaded outside a run (tests, a bare build_input_context)
            return self.store.current(partition, asset)
        return self.store.run_ref(run_id, partition, asset)
