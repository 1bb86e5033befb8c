"""What starts runs without a person: new config files, changed datasets, and each model's schedule."""

import json
import re
from pathlib import Path

import dagster as dg

from lora_pipeline.assets.common import MODEL_PARTITIONS
from lora_pipeline.assets.provenance import up_to_date_assets
from lora_pipeline.assets.stages import stage_names
from lora_pipeline.assets.settings import settings_changes
from lora_pipeline.errors import LoraPipelineError
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactStore

TUNE_JOB = "tune"


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def model_configs(context: dg.SensorEvaluationContext, registry: ModelRegistry) -> dg.SensorResult:
    """Adds a partition for every new YAML file in the config folder (removed files keep their history)
    and reports each model's settings versions that changed (observations of <stage>_settings).

    The version of <stage>_settings hashes what the stage and those before it read besides assets
    and code: their parts of the config, the library versions and the dataset source's content. A
    new one marks the stage stale in the UI at once, before any run. Versions are compared with the
    last ones reported to the instance (by this sensor or by `lora-pipeline run`). A config that
    does not validate is skipped with a warning, and a source that cannot be read leaves the stages
    whose settings cover it unreported; neither fails the tick.
    """
    from lora_pipeline.assets.starting import model_source_version

    known = registry.configs()
    existing = set(context.instance.get_dynamic_partitions(MODEL_PARTITIONS.name))
    new_keys = [key for key in known.keys if key not in existing]
    events: list[dg.AssetObservation] = []
    for key in known.keys:
        try:
            model_config = known.load(key)
        except (LoraPipelineError, OSError) as exc:  # one bad file must not stop the others
            context.log.warning(f"settings of {key} not reported: {exc}")
            continue
        try:
            source_version = model_source_version(model_config, None)
        except Exception as exc:  # remote file systems raise many types; the other stages are still reported
            context.log.warning(f"{key}: dataset source not read, so the settings that cover it (raw_dataset's "
                                f"and those after it) are not reported: {exc}")
            source_version = None
        events += settings_changes(context.instance, key, model_config, source_version)
    if events:
        context.log.info("new settings reported: " + ", ".join(
            f"{event.partition}/{event.asset_key.path[-1]}" for event in events))
    return dg.SensorResult(
        dynamic_partitions_requests=[MODEL_PARTITIONS.build_add_request(new_keys)] if new_keys else [],
        asset_events=events,
        skip_reason=None if new_keys or events else "no new model configs and no changed settings",
    )


def _stale_run(instance, key: str, model_config, storage: ArtifactStore, run_key: str, trigger: str,
               source_version: str | None = None):
    """A run of the model's assets that are not up to date, or None when all are."""
    stages = stage_names()
    current = up_to_date_assets(instance, key, stages, model_config, storage, source_version)
    stale = [name for name in stages if name not in current]
    if not stale:
        return None
    return dg.RunRequest(partition_key=key, run_key=run_key, asset_selection=[dg.AssetKey(name) for name in stale],
                         tags={"lora_pipeline/trigger": trigger})


@dg.sensor(job_name=TUNE_JOB, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def dataset_changes(context: dg.SensorEvaluationContext, registry: ModelRegistry,
                    storage: ArtifactStore) -> dg.SensorResult:
    """Re-runs a model's pipeline when its dataset source changes (file content, S3 ETag, hub revision), or when
    the model it starts from (training.init_adapter) has a new champion.

    The cursor keeps each model's last seen source version; a model seen for the first time is
    recorded, not run. The run key is the model and the new version, so one change launches
    exactly one run, of the assets that the change made stale.
    """
    from lora_pipeline.assets.starting import model_source_version

    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    known = registry.configs()
    requests, notes = [], []
    for key in known.keys:
        try:
            model_config = known.load(key)
            if not model_config.retrain.on_data_change:
                continue
            version = model_source_version(model_config, storage)
        except (LoraPipelineError, OSError) as exc:  # one unreadable source must not stop the others
            notes.append(f"{key}: {exc}")
            continue
        if key in seen and seen[key] != version:
            request = _stale_run(context.instance, key, model_config, storage, f"{key}:{version}", "dataset changed",
                                 version)
            if request is not None:
                requests.append(request)
        seen[key] = version
    for note in notes:
        context.log.warning(f"dataset not checked: {note}")
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps(seen, sort_keys=True),
        skip_reason=None if requests else "no dataset changed",
    )


def model_schedules(config_dir: str | None = None) -> list[dg.ScheduleDefinition]:
    """One schedule per model whose config sets retrain.schedule, running that model's stale assets.

    Built when the code location loads (reload it after adding a schedule to a config); configs
    that do not validate get no schedule here and fail loudly when they run.
    """
    from lora_pipeline.config.registry import ConfigRegistry

    registry = ConfigRegistry(Path(config_dir) if config_dir else None)
    schedules = []
    for key in registry.keys:
        try:
            cron = registry.load(key).retrain.schedule
        except LoraPipelineError:
            continue
        if cron is not None:
            schedules.append(_model_schedule(key, cron, registry.path_of(key).name))
    return schedules


def _model_schedule(key: str, cron: str, file_name: str) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="retrain_" + re.sub(r"[^A-Za-z0-9_]", "_", key),
        cron_schedule=cron,
        job_name=TUNE_JOB,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Re-runs the stale assets of model {key} ({cron}, from {file_name}).",
    )
    def retrain(context: dg.ScheduleEvaluationContext, registry: ModelRegistry, storage: ArtifactStore):
        model_config = registry.configs().load(key)  # as the file says now
        request = _stale_run(context.instance, key, model_config, storage,
                             f"{key}:{context.scheduled_execution_time.isoformat()}", "schedule")
        return request if request is not None else dg.SkipReason(f"model {key} is up to date")

    return retrain
