"""The resources a deployment runs with, built from the environment."""

from __future__ import annotations

import dagster as dg

from lora_pipeline.assets.common import ARTIFACT_IO
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.publishing import ENDPOINT_VARIABLE, TOKEN_VARIABLE, HubPublisher
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRefIOManager, ArtifactStore
from lora_pipeline.resources.tracking import ExperimentTracker

STORAGE_ENV = "LORA_PIPELINE_STORAGE"
CONFIG_DIR_ENV = "LORA_PIPELINE_CONFIG_DIR"
# ArtifactStore field <- the standard AWS variable it is read from.
AWS_VARIABLES = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "endpoint_url": "AWS_ENDPOINT_URL",
}


def default_resources(storage_root: str | None = None, config_dir: str | None = None) -> dict:
    """Real resources: the store from --storage or LORA_PIPELINE_STORAGE (default ./artifacts).

    S3 credentials come from the AWS variables through dg.EnvVar (only those set: an EnvVar of an
    unset variable fails the run), so no secret is ever part of the code or the run config; so do
    the Hub's token and endpoint (HF_TOKEN, HF_ENDPOINT) for publishing.
    """
    import os

    credentials = {field: dg.EnvVar(variable) for field, variable in AWS_VARIABLES.items() if os.environ.get(variable)}
    storage = ArtifactStore(root=storage_root or os.environ.get(STORAGE_ENV, "artifacts"), **credentials)
    return {
        "storage": storage,
        ARTIFACT_IO: ArtifactRefIOManager(store=storage),
        "hub": ModelHub(),
        "compute": Compute(),
        # The Hub for published_model, only when asked for; its token and endpoint as S3's credentials above.
        "publisher": HubPublisher(**{field: dg.EnvVar(variable) for field, variable in
                                     (("token", TOKEN_VARIABLE), ("endpoint", ENDPOINT_VARIABLE))
                                     if os.environ.get(variable)}),
        # MLflow for the configs whose tracking.report_to names it; the others contact nothing.
        "tracker": ExperimentTracker(),
        "registry": ModelRegistry(config_dir=config_dir or os.environ.get(CONFIG_DIR_ENV, "configs")),
    }
