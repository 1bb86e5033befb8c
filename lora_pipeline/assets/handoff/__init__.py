"""The on-demand hand-off stages: what users take a model away with (the Hub, GGUF files), run only when asked."""

import dagster as dg

from lora_pipeline.assets.common import ARTIFACT_IO, MODEL_PARTITIONS


def handoff_asset(*, kinds: set[str], code_version: str = "1"):
    """The declaration of an on-demand stage: one partition per model, ArtifactRef pointers, in the decision
    group. Listed in its module's ON_DEMAND_ASSETS, it is in the graph but in no job that runs on its own
    (assets/__init__.py; definitions.py gives each its own job)."""
    return dg.asset(partitions_def=MODEL_PARTITIONS, io_manager_key=ARTIFACT_IO, kinds=kinds, group_name="decision",
                    code_version=code_version)
