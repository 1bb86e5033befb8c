"""Shared fixtures: a micro model config, fake resources in a temp folder, a built micro base."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Under pytest-xdist (make test runs two workers on two cores) each worker and the processes it starts train on
# one thread: two workers with two threads each would oversubscribe the cores, which costs OpenMP far more than
# it gains (a test that takes 2 minutes alone took 11 beside another that way).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_variable] = "1"

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "lora_pipeline" / "data" / "sample_instructions.json"
SHARED_DATA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"


def micro_config_data(**sections) -> dict:
    """A config that trains the micro built-in model for a few steps: seconds on a CPU."""
    data = {
        "base_model": "builtin:micro-llama",
        "dataset": {"source": str(SAMPLE_DATA), "format": "alpaca", "eval_fraction": 0.15, "max_rows": 160},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"},
        "quantization": {"mode": "nf4", "double_quant": True},
        "training": {
            "max_steps": 8, "batch_size": 8, "learning_rate": 3e-3, "max_length": 96, "logging_steps": 2,
            "warmup": 0.0,
        },
        "eval": {"max_examples": 16, "batch_size": 8, "samples": 2, "max_new_tokens": 8},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return data


@pytest.fixture
def data_file(tmp_path):
    """A small copy of the bundled sample dataset (60 rows) that a test may edit, as a user edits their data."""
    rows = json.loads(SAMPLE_DATA.read_text())[:60]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture
def write_config(tmp_path):
    """Write a config YAML into tmp_path/configs and return its path."""

    def write(name: str = "micro", **sections) -> Path:
        folder = tmp_path / "configs"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(micro_config_data(**sections)))
        return path

    return write


@pytest.fixture
def fake_resources(tmp_path):
    """Resources on a temp folder: local store, offline hub, CPU compute, temp config registry."""
    from lora_pipeline.assets.common import ARTIFACT_IO
    from lora_pipeline.resources import (
        ArtifactRefIOManager,
        ArtifactStore,
        FixedCompute,
        LocalModelHub,
        ModelRegistry,
        NoTracking,
    )

    store = ArtifactStore(root=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    return {
        "storage": store,
        ARTIFACT_IO: ArtifactRefIOManager(store=store),
        "hub": LocalModelHub(cache_dir=str(tmp_path / "models")),
        "compute": FixedCompute(device="cpu"),
        "registry": ModelRegistry(config_dir=str(tmp_path / "configs")),
        "tracker": NoTracking(),
    }


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory) -> Path:
    """The micro built-in model, built once per session from the sample data."""
    from lora_pipeline.ml.base.tiny import BUILTIN_MODELS, build_tiny_llama

    out = tmp_path_factory.mktemp("micro-base")
    return build_tiny_llama(sample_corpus(), out, BUILTIN_MODELS["micro-llama"])


def sample_corpus() -> list[str]:
    """The texts the micro model's tokenizer is trained on: what the pipeline gives it for the test config."""
    from lora_pipeline.ml.data.clean import clean_rows, tokenizer_corpus
    from lora_pipeline.ml.data.raw import load_dataset

    return tokenizer_corpus(clean_rows(load_dataset(dataset_settings(max_rows=160))), 0.15)


def dataset_settings(**fields):
    """A dataset config section (the sample data unless source is given)."""
    from lora_pipeline.config.schema import DatasetSettings

    return DatasetSettings(**{"source": str(SAMPLE_DATA), **fields})


def format_rows(tokenizer, dataset=None, dedupe: str = "normalized", **format_fields):
    """Load, clean and format a dataset section with a tokenizer: what formatted_dataset does."""
    from lora_pipeline.ml.data.clean import clean_rows
    from lora_pipeline.ml.data.formatted import FormatSettings, format_dataset
    from lora_pipeline.ml.data.raw import load_dataset

    loaded = load_dataset(dataset or dataset_settings())
    return format_dataset(clean_rows(loaded, dedupe), tokenizer, FormatSettings(**format_fields))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, with dummy credentials in the environment."""
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {name: os.environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                                       "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the S3 server; returns its name and an s3fs filesystem on it."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
    name = f"bucket-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return name, fs
