"""What made each artifact: the versions computed before anything runs, and the lineage every artifact carries.

The kinds of version are defined once, in the glossary of stages.py. In short: a stage version
hashes the stage's code version, its settings version and its parents' stage versions; equal
versions mean equal outputs, so a run skips a stage whose newest materialization already has the
version it would produce now, and a change re-runs exactly the stages that read it and those after.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import time
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lora_pipeline.assets.stages import pipeline, upstream_stages
from lora_pipeline.config.schema import ModelConfig
from lora_pipeline.resources.artifacts import LINEAGE

# The tag Dagster keeps a materialization's or an observation's data version in.
DATA_VERSION_TAG = "dagster/data_version"

# The libraries whose upgrade can change an output; part of every version.
STACK = ("torch", "transformers", "tokenizers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
         "pyarrow", "pandas")


@functools.cache
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that produce the artifacts."""
    found = {}
    for name in STACK:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def stage_config(model_config: ModelConfig, stage: str) -> dict:
    """The part of the config a stage reads, as its decorator declares it."""
    return pipeline()[stage].reads.of(model_config)


def reads_source(model_config: ModelConfig, stage: str) -> bool:
    """Whether the stage reads the dataset source's content itself, not only through a parent."""
    return pipeline()[stage].reads.reads_source(model_config)


def stage_settings_versions(model_config: ModelConfig, source_version: str | None) -> dict[str, str]:
    """Per stage, the version of what it reads besides its parents and its code, in pipeline order.

    With source_version None (the source cannot be read now), the stages that read the source are
    left out and the others are still given.
    """
    settings: dict[str, str] = {}
    for stage in pipeline():
        payload = {"libraries": library_versions(), "config": stage_config(model_config, stage)}
        if reads_source(model_config, stage):
            if source_version is None:
                continue
            payload["source"] = source_version
        settings[stage] = _short_hash(payload)
    return settings


def settings_asset_versions(model_config: ModelConfig, source_version: str | None) -> dict[str, str]:
    """Per stage, the data version of its <stage>_settings asset: a hash of the settings versions and
    the code versions of the stage and of every stage before it, in pipeline order.

    Dagster marks a stage stale when a dependency has a new data version (or its own code version
    changed), but not the stages after it until it is re-run; folding in the earlier stages'
    settings and code versions marks at once every stage a run would redo. A stage whose settings,
    or an earlier stage's, are unknown (the source cannot be read) is left out.
    """
    own = stage_settings_versions(model_config, source_version)
    stages = pipeline()
    return {stage: _short_hash({"settings": covered, "code": {name: stages[name].code_version for name in covered}})
            for stage in stages if (covered := settings_covered(own, stage)) is not None}


def settings_covered(own: dict[str, str], stage: str) -> dict[str, str] | None:
    """The settings versions of the stage and the stages before it, or None if one is unknown."""
    stages = [*upstream_stages(stage), stage]
    return {name: own[name] for name in stages} if all(name in own for name in stages) else None


def stage_versions(model_config: ModelConfig, source_version: str) -> dict[str, str]:
    """The version every stage would produce for this config and source content, in pipeline order."""
    settings = stage_settings_versions(model_config, source_version)
    versions: dict[str, str] = {}
    for stage in pipeline().values():
        versions[stage.name] = _short_hash({
            "code": stage.code_version,
            "settings": settings[stage.name],
            "parents": {parent: versions[parent] for parent in stage.parents},
        })
    return versions


def _short_hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --- lineage ----------------------------------------------------------------------------------------

_STAGE_STARTED: ContextVar[float] = ContextVar("stage_started", default=0.0)


def mark_stage_start() -> None:
    """Note when the running stage started (its lineage records the wall time)."""
    _STAGE_STARTED.set(time.time())


@functools.cache
def code_commit() -> str:
    """The git commit of the pipeline's code (LORA_PIPELINE_GIT_COMMIT in images built without .git)."""
    if os.environ.get("LORA_PIPELINE_GIT_COMMIT"):
        return os.environ["LORA_PIPELINE_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware(device=None) -> dict:
    """The machine a stage ran on."""
    described = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if device is not None:
        described.update(device=device.device, gpu_count=device.gpu_count,
                         gpu_memory_gib=round(device.gpu_memory_bytes / 2**30, 1), bf16=device.bf16_supported)
    return described


def lineage_record(
    stage: str,
    partition: str,
    model_config: ModelConfig,
    versions: dict[str, str],
    source_version: str,
    parents: dict[str, dict],
    run_id: str,
    device=None,
    **facts,
) -> dict:
    """Everything needed to say what made an artifact, written into it as LINEAGE.json."""
    started = _STAGE_STARTED.get() or time.time()
    return {
        "asset": stage,
        "model": partition,
        "version": versions[stage],
        "code_version": pipeline()[stage].code_version,
        "source_version": source_version,
        "parents": parents,
        "base_model": model_config.base_model,
        "base_revision": model_config.base_revision,
        "config_hash": model_config.canonical_hash(),
        "config": model_config.model_dump(mode="json"),
        "seed": model_config.training.seed,
        "libraries": library_versions(),
        "git_commit": code_commit(),
        "hardware": hardware(device),
        "dagster_run_id": run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 3),
        **facts,
    }


def parent_lineage(folder: Path) -> dict:
    """The lineage of an input artifact (its folder), or {} for artifacts made before lineage existed."""
    path = folder / LINEAGE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


# --- what is up to date -----------------------------------------------------------------------------

def plain_metadata(metadata: dict) -> dict:
    """Metadata values as JSON-friendly Python values (inlined plots left out: their files sit in the artifact)."""
    result = {}
    for key, entry in metadata.items():
        value = getattr(entry, "value", entry)
        if isinstance(value, str) and "data:image" in value:
            continue
        result[key] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
    return result


def readable_source_version(model_config: ModelConfig, storage=None) -> str | None:
    """The source version (the dataset source's content; with training.init_adapter, the starting champion's
    version too), or None when the source cannot be read now (raw_dataset will say why). storage: the store
    the starting champion is in (None: the deployment's)."""
    from lora_pipeline.assets.starting import model_source_version
    from lora_pipeline.errors import DataError

    try:
        return model_source_version(model_config, storage)
    except (DataError, OSError):
        return None


def newest_materialization(instance, key: str, name: str):
    """The record of the newest materialization of asset `name` for model `key`, or None."""
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[key]), limit=1
    ).records
    return records[0] if records else None


def _materialized_version(instance, key: str, name: str) -> tuple[object, str | None]:
    """The newest materialization of asset `name` for model `key` (or None) and the version it has."""
    record = newest_materialization(instance, key, name)
    materialization = record.asset_materialization if record is not None else None
    return materialization, materialization.tags.get(DATA_VERSION_TAG) if materialization is not None else None


def stale_assets(instance, key: str, model_config: ModelConfig, source_version: str) -> list[str]:
    """The materialized stages whose newest materialization has another version than a run would give them
    now (what the UI marks stale), in pipeline order."""
    versions = stage_versions(model_config, source_version)
    stale = []
    for name in pipeline():
        materialization, materialized = _materialized_version(instance, key, name)
        if materialization is not None and materialized != versions[name]:
            stale.append(name)
    return stale


def up_to_date_assets(instance, key: str, selected: list[str], model_config, storage,
                      source_version: str | None = None) -> dict[str, dict]:
    """The selected assets whose newest materialization has the version they would get now, and whose
    artifact is still the current one in the store and intact: {name: summary entry}.

    source_version: the source's content version when the caller has it (else it is read here).
    """
    source_version = source_version or readable_source_version(model_config)
    if source_version is None:
        return {}  # the source cannot be read now: let raw_dataset say why
    versions = stage_versions(model_config, source_version)
    current = {}
    for name in selected:
        materialization, materialized = _materialized_version(instance, key, name)
        if materialization is None or materialized != versions[name]:
            continue
        metadata = plain_metadata(materialization.metadata)
        if _published_intact(storage, key, name, metadata) is not None:
            current[name] = {"uri": metadata.get("uri"), "metadata": metadata, "up_to_date": True}
    return current


def _published_intact(storage, key: str, name: str, metadata: dict):
    """The store's current artifact of asset `name` for model `key` if it is the one this materialization
    published (no other run published since) and still matches its manifest; else None."""
    from lora_pipeline.resources.storage import ArtifactIntegrityError

    try:
        ref = storage.current(key, name)
        if ref.sha256 != metadata.get("sha256"):
            return None  # another run published since
        storage.local_path(ref)
    except ArtifactIntegrityError:
        return None
    return ref


def reuse_from_siblings(instance, key: str, siblings: list[str], names: list[str], model_config, storage,
                        source_version: str | None) -> dict[str, dict]:
    """For each of `names` (in pipeline order), a sibling partition's artifact with exactly the version this
    partition's would have (same code, settings and parents): made current here instead of made again.

    This is how a sweep's variants share their data and base: a stage's version does not depend on
    the partition, so equal versions mean equal outputs. Each reuse is recorded as a materialization
    of this partition (the sibling's metadata and tags, plus reused_from). Returns {name: summary entry}.
    """
    import dagster as dg

    if source_version is None:
        return {}
    versions = stage_versions(model_config, source_version)
    reused: dict[str, dict] = {}
    for name in names:
        for sibling in siblings:
            materialization, materialized = _materialized_version(instance, sibling, name)
            if sibling == key or materialization is None or materialized != versions[name]:
                continue
            metadata = plain_metadata(materialization.metadata)
            ref = _published_intact(storage, sibling, name, metadata)
            if ref is None:
                continue
            storage.point_current(key, name, ref, run_order=time.time())  # as a run launched now would
            instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key=name, partition=key, metadata={**materialization.metadata, "reused_from": sibling},
                tags=materialization.tags,
            ))
            reused[name] = {"uri": metadata.get("uri"), "metadata": {**metadata, "reused_from": sibling}}
            break
    return reused
