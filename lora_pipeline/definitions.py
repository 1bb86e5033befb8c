"""The Dagster code location: assets and checks, the settings they read, the tune job, sensors, per-model
schedules, resources."""

import dagster as dg

from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS, SETTINGS_SPECS
from lora_pipeline.resources.factory import default_resources
from lora_pipeline.sensors import TUNE_JOB, dataset_changes, model_configs, model_schedules

tune = dg.define_asset_job(
    TUNE_JOB,
    selection=PIPELINE_ASSETS,
    description="The whole pipeline for one model: data, quantized base, adapter, merged model, report.",
)

defs = dg.Definitions(
    assets=[*PIPELINE_ASSETS, *SETTINGS_SPECS],
    asset_checks=PIPELINE_CHECKS,
    jobs=[tune],
    sensors=[model_configs, dataset_changes],
    schedules=model_schedules(),
    resources=default_resources(),
)
