"""The model config schema and the registry of config files."""

from lora_pipeline.config.registry import ConfigRegistry, load_config_file, validate_config
from lora_pipeline.config.schema import ModelConfig, TuningRunConfig

__all__ = ["ConfigRegistry", "ModelConfig", "TuningRunConfig", "load_config_file", "validate_config"]
