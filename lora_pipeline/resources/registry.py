"""The model registry resource: which config file belongs to which partition."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from lora_pipeline.config.registry import ConfigRegistry


class ModelRegistry(dg.ConfigurableResource):
    """The folder of per-model YAML configs; each file is one partition, keyed by its name."""

    config_dir: str = Field(
        default="configs",
        description="Folder of model configs (*.yaml); relative paths are resolved against the working directory.",
    )

    def configs(self) -> ConfigRegistry:
        """The configs currently in the folder."""
        return ConfigRegistry(Path(self.config_dir))
