"""The <stage>_settings assets: what each stage and the stages before it read besides assets, and their code.

Dagster's staleness follows code versions and upstream data versions, not run config, so on its
own the UI would not mark trained_adapter stale after someone edits lora.r in a model's YAML. So
each stage depends on an external asset, one partition per model, whose observations carry a
hash of the settings versions and code versions of the
stage and of every stage before it. A run records the versions it was made from, and an
observation with a new version marks the stage stale. Dagster does not mark the stages after a
stale stage until it is re-run, hence the earlier stages' settings and code in each version: an
edit or a new code version marks at once exactly the stages a run would redo. The model_configs
sensor and `lora-pipeline run` report them. (The versions are defined in stages.py's glossary.)
"""

from __future__ import annotations

import dagster as dg

from lora_pipeline.assets.common import MODEL_PARTITIONS
from lora_pipeline.assets.provenance import (
    DATA_VERSION_TAG,
    library_versions,
    reads_source,
    settings_asset_versions,
    settings_covered,
    stage_config,
    stage_settings_versions,
)
from lora_pipeline.assets.stages import SETTINGS_GROUP, pipeline, settings_key, upstream_stages
from lora_pipeline.config.schema import ModelConfig


def _description(stage: str) -> str:
    earlier = upstream_stages(stage)
    also = f" Its version also covers the settings and code versions of the stages before it ({', '.join(earlier)})." \
        if earlier else ""
    return (
        f"What {stage} reads besides its parent assets: {pipeline()[stage].reads.describe()}; the library "
        f"versions; and its code version.{also} Reported per model by the model_configs sensor and by every "
        f"`lora-pipeline run`. A change of what {stage} reads, or of its code, gives this and the settings of "
        f"every stage after it a new version, which marks {stage} and everything after it stale."
    )


def settings_specs() -> list[dg.AssetSpec]:
    """One <stage>_settings asset per declared stage, in pipeline order."""
    return [
        dg.AssetSpec(settings_key(stage), partitions_def=MODEL_PARTITIONS, group_name=SETTINGS_GROUP,
                     description=_description(stage))
        for stage in pipeline()
    ]


def settings_observation(key: str, stage: str, version: str, model_config: ModelConfig,
                         source_version: str | None) -> dg.AssetObservation:
    """The observation of <stage>_settings for model `key`; its metadata shows what the version hashes,
    so two observations tell which stage's settings changed."""
    own = stage_settings_versions(model_config, source_version)
    metadata = {
        "config": stage_config(model_config, stage),
        "libraries": ", ".join(f"{k} {v}" for k, v in library_versions().items()),
        "settings_versions": settings_covered(own, stage) or {},
    }
    if reads_source(model_config, stage):
        metadata["source_version"] = str(source_version or "")
    return dg.AssetObservation(asset_key=settings_key(stage), partition=key, tags={DATA_VERSION_TAG: version},
                               metadata=metadata)


def latest_settings_version(instance: dg.DagsterInstance, key: str, stage: str) -> str | None:
    """The version of <stage>_settings last reported for model `key`, or None."""
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=settings_key(stage), asset_partitions=[key]), limit=1
    ).records
    return records[0].asset_observation.data_version if records and records[0].asset_observation else None


def settings_changes(instance: dg.DagsterInstance, key: str, model_config: ModelConfig,
                     source_version: str | None) -> list[dg.AssetObservation]:
    """Observations of model `key`'s settings whose versions differ from those last reported.

    Compared with the instance, not with a sensor cursor, so whoever reported last (the sensor, a
    CLI run with --set, a run killed before it could report the file's settings again) the next
    check puts the file's settings back. With source_version None (the source cannot be read), the
    stages whose settings cover it are left as they were.
    """
    return [
        settings_observation(key, stage, version, model_config, source_version)
        for stage, version in settings_asset_versions(model_config, source_version).items()
        if latest_settings_version(instance, key, stage) != version
    ]


def report_settings(instance: dg.DagsterInstance, key: str, model_config: ModelConfig,
                    source_version: str | None) -> list[str]:
    """Report model `key`'s settings that changed since last reported; return their stages."""
    changes = settings_changes(instance, key, model_config, source_version)
    for observation in changes:
        instance.report_runless_asset_event(observation)
    return [observation.asset_key.path[-1].removesuffix("_settings") for observation in changes]
