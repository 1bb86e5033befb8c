"""The six pipeline assets, in order, and the settings assets they depend on."""
from lora_pipeline.assets.base import quantized_base
from lora_pipeline.assets.data import DATA_CHECKS, formatted_dataset, raw_dataset
from lora_pipeline.assets.evaluation import eval_report
from lora_pipeline.assets.merge import merged_model
from lora_pipeline.assets.settings import SETTINGS_SPECS
from lora_pipeline.assets.training import trained_adapter

PIPELINE_ASSETS = [raw_dataset, formatted_dataset, quantized_base, trained_adapter, merged_model, eval_report]

PIPELINE_CHECKS = [*DATA_CHECKS]

__all__ = ["PIPELINE_ASSETS", "PIPELINE_CHECKS", "SETTINGS_SPECS"] + [a.key.path[-1] for a in PIPELINE_ASSETS]
