"""What every stage shares: the model partitions, config resolution and metadata helpers."""

import functools
import inspect
import json
from pathlib import Path

import dagster as dg
import numpy as np

from lora_pipeline.assets.provenance import (
    lineage_record,
    mark_stage_start,
    parent_lineage,
    stage_versions,
)
from lora_pipeline.assets.stages import Reads, Stage, declare, settings_key
from lora_pipeline.config.registry import is_model_key, validate_config
from lora_pipeline.config.schema import ModelConfig, TuningRunConfig
from lora_pipeline.deploy import k8s_step_tags
from lora_pipeline.errors import ConfigError
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.artifacts import LINEAGE
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

# Dynamic, so that any YAML file can become a model: the files under configs/ are added by the
# model_configs sensor and by the CLI, and `lora-pipeline run` adds a file from anywhere.
MODEL_PARTITIONS = dg.DynamicPartitionsDefinition(name="models")

ARTIFACT_IO = "artifact_io"
# The config fields that say which base model is loaded, and how.
BASE_MODEL_FIELDS = ("base_model", "base_revision", "allow_pickle", "trust_remote_code")
GPU_POOL = "gpu"

# Data stages and their checks run before the model stages of the same run, so bad data fails
# first instead of after the base model has been downloaded and quantized.
DATA_FIRST = {"dagster/priority": "10"}


def pipeline_asset(*, kinds: set[str], group: str, code_version: str, reads: Reads, uses_gpu: bool = False,
                   gpus: int = 1, check_specs: list[dg.AssetCheckSpec] | None = None):
    """The decorator of every stage, and its one declaration: one partition per model, ArtifactRef
    pointers, its code version (bump it when the code changes what the stage makes) and what it
    reads besides its parent assets (`Reads`, hashed into its settings version; see stages.py).

    Stages that put a model on the accelerator run in the `gpu` pool, so an instance never runs
    more of them at once than its pool limit (the number of GPUs); on Kubernetes only their pods
    ask for a GPU (`dagster-k8s/config` tags, lora_pipeline/deploy.py). Data stages run first. A stage
    runs holding its partition's writer lock in the store, so two runs of one model never
    interleave their writes: the second stops with the first one named. Each stage depends on its
    settings asset (<stage>_settings), whose observed versions are how the UI learns of config,
    library and data changes: Dagster's staleness sees code versions and upstream data versions,
    not run config. A stage with check_specs reports those checks itself: it is a generator that
    yields its output and then one AssetCheckResult per check.
    """

    def decorate(compute):
        if inspect.isgeneratorfunction(compute):
            @functools.wraps(compute)
            def as_sole_writer(context: dg.AssetExecutionContext, **inputs):
                mark_stage_start()
                with inputs["storage"].writer_lock(context.partition_key, context.asset_key.path[-1], context.run_id):
                    yield from compute(context, **inputs)
        else:
            @functools.wraps(compute)  # Dagster reads the parameters and docstring through the wrapper
            def as_sole_writer(context: dg.AssetExecutionContext, **inputs):
                storage = inputs["storage"]
                mark_stage_start()
                with storage.writer_lock(context.partition_key, context.asset_key.path[-1], context.run_id):
                    return compute(context, **inputs)

        definition = dg.asset(
            op_tags={**(DATA_FIRST if group == "data" else {}), **k8s_step_tags(uses_gpu, gpus)} or None,
            partitions_def=MODEL_PARTITIONS,
            io_manager_key=ARTIFACT_IO,
            kinds=kinds,
            group_name=group,
            deps=[settings_key(compute.__name__)],
            code_version=code_version,
            pool=GPU_POOL if uses_gpu else None,
            check_specs=check_specs,
        )(as_sole_writer)
        declare(Stage(compute.__name__, group, code_version, reads), definition)
        return definition

    return decorate


def stage_lineage(
    context: dg.AssetExecutionContext,
    model_config: ModelConfig,
    storage: ArtifactStore,
    parents: dict[str, ArtifactRef],
    source_version: str | None = None,
    device=None,
    **facts,
) -> dict:
    """This stage's lineage record (LINEAGE.json), whose 'version' is the stage's data version.

    The source's content version comes from the parents' lineage unless given (raw_dataset).
    """
    stage = context.asset_key.path[-1]
    parent_records = {name: parent_lineage(storage.local_path(ref)) for name, ref in parents.items()}
    if source_version is None:
        source_version = next((r["source_version"] for r in parent_records.values() if r.get("source_version")), "")
    fingerprint = next((r["dataset_fingerprint"] for r in parent_records.values() if r.get("dataset_fingerprint")), None)
    if fingerprint is not None:
        facts.setdefault("dataset_fingerprint", fingerprint)
    versions = stage_versions(model_config, source_version)
    return lineage_record(
        stage, context.partition_key, model_config, versions, source_version,
        {name: {"uri": ref.uri, "sha256": ref.sha256, "version": parent_records[name].get("version")}
         for name, ref in parents.items()},
        context.run_id, device, **facts,
    )


def publish_stage(context: dg.AssetExecutionContext, storage: ArtifactStore, staging: Path, record: dict) -> ArtifactRef:
    """Write the stage's lineage into its staged artifact and publish it."""
    write_json(staging / LINEAGE, record)
    asset, order = context.asset_key.path[-1], run_order(context)
    ref = storage.publish(staging, context.partition_key, asset, order)
    if order is not None and storage.current(context.partition_key, asset) != ref:
        context.log.warning(f"a run launched after this one has published {asset} already: it stays current, and "
                            "this run's version is used by this run alone")
    return ref


def run_order(context) -> float | None:
    """When the run was launched (what orders the runs that move a model's current pointers), if known."""
    record = context.instance.get_run_record_by_id(context.run_id)
    return record.create_timestamp.timestamp() if record is not None and record.create_timestamp else None


def stage_output(ref: ArtifactRef, record: dict, model_config: ModelConfig, metadata: dict) -> dg.Output[ArtifactRef]:
    """The stage's output: the pointer, its version as the Dagster data version, and its metadata.

    Metadata values are plain Python values, which Dagster wraps itself; only markdown and paths are
    wrapped by the stages. NumPy scalars (counts, means) become Python ones here, once.
    """
    merged = {**ref_metadata(ref), **config_metadata(model_config), **lineage_metadata(record), **metadata}
    return dg.Output(
        ref,
        data_version=dg.DataVersion(record["version"]),
        metadata={key: value.item() if isinstance(value, np.generic) else value for key, value in merged.items()},
    )


def lineage_metadata(record: dict) -> dict:
    """The lineage facts worth a glance in the UI (the whole record is LINEAGE.json in the artifact)."""
    compute = {"compute": record["compute"]} if "compute" in record else {}
    return {
        **compute,
        "version": record["version"],
        "git_commit": record["git_commit"],
        "libraries": ", ".join(f"{k} {v}" for k, v in record["libraries"].items()),
        "wall_seconds": record["wall_seconds"],
    }


def merge_weights_kind(setting: str, quantized: bool) -> str:
    """Resolve merge.base_weights: 'auto' is the dequantized weights for quantized bases, else the originals."""
    if setting != "auto":
        return setting
    return "dequantized" if quantized else "original"


def resolve_model_config(
    context: dg.AssetExecutionContext, config: TuningRunConfig, registry: ModelRegistry
) -> ModelConfig:
    """The partition's model config: its YAML file, with any sections given in the run config replacing the file's."""
    key = context.partition_key
    if not is_model_key(key):
        raise ConfigError(f"model key {key!r} is not valid; use lowercase letters, digits, '.', '_' and '-' "
                          "(never '..')")
    given = config.sections_given()
    known = registry.configs()
    if key in known.keys:
        data = {**known.raw(key), **given}
        origin = str(known.path_of(key)) + (" with run config" if given else "")
    elif "base_model" in given and "dataset" in given:
        data, origin = given, f"run config of model {key!r}"
    else:
        raise ConfigError(
            f"model {key!r} has no config file in {known.config_dir} and the run config does not give "
            "one; launch it with `lora-pipeline run FILE.yaml` or re-execute its last run"
        )
    model_config = validate_config(data, origin)
    context.log.info(f"model {key}: config {model_config.canonical_hash()[:12]} from {origin}")
    return model_config


def ref_metadata(ref: ArtifactRef) -> dict:
    """Where an artifact lives and what it weighs: the first lines of every asset's metadata."""
    return {
        "uri": dg.MetadataValue.path(ref.uri),
        "sha256": ref.sha256,
        "size_mb": round(ref.size_bytes / 2**20, 3),
        "files": ref.files,
    }


def config_metadata(model_config: ModelConfig) -> dict:
    """The config hash (part of every data version) and the base model."""
    return {
        "config_hash": model_config.canonical_hash(),
        "base_model": model_config.base_model,
    }


def write_json(path: Path, payload: dict) -> None:
    """Pretty JSON, UTF-8, sorted keys."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")


def read_json(path: Path) -> dict:
    """Read a JSON file written by write_json."""
    return json.loads(path.read_text(encoding="utf-8"))
