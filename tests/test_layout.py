"""House rules that keep the layers apart."""

from __future__ import annotations

import subprocess
import sys
import typing

import pydantic

from conftest import REPO


def test_ml_code_imports_neither_dagster_nor_torch_at_import_time():
    ml = REPO / "lora_pipeline" / "ml"
    modules = sorted(".".join(p.relative_to(ml).with_suffix("").parts) for p in ml.rglob("*.py") if p.stem != "__init__")
    assert len(modules) >= 18 and "data.formatted" in modules
    probe = (
        "import sys\n"
        + "".join(f"import lora_pipeline.ml.{name}\n" for name in modules)
        + "print(sorted(m for m in ('dagster', 'torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_asset_and_config_field_describes_itself():
    from lora_pipeline.assets import PIPELINE_ASSETS
    from lora_pipeline.config import schema

    for asset in PIPELINE_ASSETS:
        assert asset.descriptions_by_key[asset.key], asset.key
    # Every section reachable from the run config, nested ones (training.distributed) included.
    sections, found = [schema.TuningRunConfig, schema.ModelConfig], []
    while sections:
        cls = sections.pop()
        found.append(cls)
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            for inner in (field.annotation, *typing.get_args(field.annotation)):  # Optional[Section] too
                if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel) and inner not in found + sections:
                    sections.append(inner)
    names = {cls.__name__ for cls in found}
    assert {"ModelConfig", "DistributedSettings", "ExportSettings", "TrackingSettings"} <= names, names


def test_the_production_instance_config_is_valid_and_recovers_crashed_runs():
    """deploy/dagster.yaml passes Dagster's own schema; dead pods are noticed, their slots freed, their runs retried."""
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(REPO / "deploy"), "dagster.yaml")
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["run_retries"]["max_retries"] >= 1
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False  # a bad config fails once, not thrice
    assert config["concurrency"]["pools"]["default_limit"] >= 1
