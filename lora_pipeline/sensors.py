"""Keeps the model partitions in step with the config folder."""

import dagster as dg

from lora_pipeline.assets.common import MODEL_PARTITIONS
from lora_pipeline.resources.registry import ModelRegistry


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def model_configs(context: dg.SensorEvaluationContext, registry: ModelRegistry) -> dg.SensorResult:
    """Adds a partition for every new YAML file in the config folder (removed files keep their history)."""
    known = set(context.instance.get_dynamic_partitions(MODEL_PARTITIONS.name))
    new_keys = [key for key in registry.registry().keys if key not in known]
    return dg.SensorResult(
        dynamic_partitions_requests=[MODEL_PARTITIONS.build_add_request(new_keys)] if new_keys else [],
        skip_reason=None if new_keys else "no new model configs",
    )
