"""The Dagster code location: assets and checks, the settings they read, the tune job, sensors, per-model
schedules, resources."""

import dagster as dg

from lora_pipeline.assets import ON_DEMAND_ASSETS, OTHER_ASSETS, PIPELINE_ASSETS, PIPELINE_CHECKS, SETTINGS_SPECS
from lora_pipeline.assets.handoff import HANDOFF_JOBS
from lora_pipeline.deploy import step_executor
from lora_pipeline.resources.factory import default_resources
from lora_pipeline.reclaim import dead_runs
from lora_pipeline.sensors import TUNE_JOB, dataset_changes, model_configs, model_schedules

tune = dg.define_asset_job(
    TUNE_JOB,
    selection=PIPELINE_ASSETS,
    description="The whole pipeline for one model: data, quantized base, adapter, merged model, report, champion.",
)
rank_sweep = dg.define_asset_job(
    "leaderboard_job",
    selection=OTHER_ASSETS,
    description="A sweep's leaderboard, from its variants' current eval reports (run the variants first).",
)
publish = dg.define_asset_job(
    HANDOFF_JOBS["published_model"],
    selection=dg.AssetSelection.assets("published_model"),
    description="Upload a model's champion to the Hugging Face Hub (publish.repo_id in its config, $HF_TOKEN); "
    "on demand only: no sensor or schedule launches it.",
)
export = dg.define_asset_job(
    HANDOFF_JOBS["gguf_export"],
    selection=dg.AssetSelection.assets("gguf_export"),
    description="Convert a model's merged model, base and adapter to GGUF for llama.cpp and Ollama (export.gguf in "
    "its config), with Modelfiles; on demand only.",
)


def build_definitions(resources: dict | None = None, loggers: dict | None = None,
                      automation: bool = True) -> dg.Definitions:
    """The definitions of this code location; the CLI builds them with its own resources and logger
    and without the sensors and schedules, which only a daemon runs."""
    return dg.Definitions(
        assets=[*PIPELINE_ASSETS, *ON_DEMAND_ASSETS, *OTHER_ASSETS, *SETTINGS_SPECS],
        asset_checks=PIPELINE_CHECKS,
        jobs=[tune, rank_sweep, publish, export],
        sensors=[model_configs, dataset_changes, dead_runs] if automation else None,
        schedules=model_schedules() if automation else None,
        resources=default_resources() if resources is None else resources,
        loggers=loggers,
        executor=step_executor(),  # one pod per step with LORA_PIPELINE_EXECUTOR=k8s; else in the run worker
    )


defs = build_definitions()
