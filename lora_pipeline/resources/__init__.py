"""Dagster resources: interfaces with a real and a fake implementation each."""

from lora_pipeline.resources.compute import Compute, FixedCompute
from lora_pipeline.resources.hub import LocalModelHub, ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactRefIOManager, ArtifactStore
from lora_pipeline.resources.tracking import ExperimentTracker, NoTracking

__all__ = [
    "ArtifactRef",
    "ArtifactRefIOManager",
    "ArtifactStore",
    "Compute",
    "ExperimentTracker",
    "FixedCompute",
    "LocalModelHub",
    "ModelHub",
    "ModelRegistry",
    "NoTracking",
]
