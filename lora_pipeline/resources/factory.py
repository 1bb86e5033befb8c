"""The resources a deployment runs with, built from the environment."""

from __future__ import annotations

import dagster as dg

from lora_pipeline.assets.common import ARTIFACT_IO
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRefIOManager, ArtifactStore

STORAGE_ENV = "LORA_PIPELINE_STORAGE"
CONFIG_DIR_ENV = "LORA_PIPELINE_CONFIG_DIR"


def default_resources(storage_root: str | None = None, config_dir: str | None = None) -> dict:
    """Real resources: the store from --storage or LORA_PIPELINE_STORAGE (default ./artifacts)."""
    import os

    storage = ArtifactStore(root=storage_root or os.environ.get(STORAGE_ENV, "artifacts"))
    return {
        "storage": storage,
        ARTIFACT_IO: ArtifactRefIOManager(store=storage),
        "hub": ModelHub(),
        "compute": Compute(),
        "registry": ModelRegistry(config_dir=config_dir or os.environ.get(CONFIG_DIR_ENV, "configs")),
    }
