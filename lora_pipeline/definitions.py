"""The Dagster code location: assets, the tune job, the config sensor and the resources."""

import dagster as dg

from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
from lora_pipeline.resources.factory import default_resources
from lora_pipeline.sensors import model_configs

tune = dg.define_asset_job(
    "tune",
    selection=PIPELINE_ASSETS,
    description="The whole pipeline for one model: data, quantized base, adapter, merged model, report.",
)

defs = dg.Definitions(
    assets=PIPELINE_ASSETS,
    asset_checks=PIPELINE_CHECKS,
    jobs=[tune],
    sensors=[model_configs],
    resources=default_resources(),
)
