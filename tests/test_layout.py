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


def test_the_docs_name_the_stages_and_groups_the_code_declares():
    """The first-run tutorial's tour of the UI counts the stages and names each group's members: from the definitions."""
    import re

    from lora_pipeline.assets import ON_DEMAND_ASSETS, PIPELINE_ASSETS, SETTINGS_SPECS
    from lora_pipeline.assets.stages import stage_names

    words = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
    assert {spec.group_name for spec in SETTINGS_SPECS} == {"settings"}
    page = (REPO / "docs" / "tutorials" / "first-run.md").read_text(encoding="utf-8")
    tour = page[page.index("You will see the "):page.index("with their descriptions")]
    groups = {}
    for asset in [*PIPELINE_ASSETS, *ON_DEMAND_ASSETS]:
        for key in asset.keys:
            groups.setdefault(asset.group_names_by_key[key], []).append(key.to_user_string())
    tour = " ".join(tour.split())
    assert f"the {words[len(stage_names())]} stages in {words[len(groups) + 1]} groups" in tour  # + settings
    for group, names in groups.items():
        for name in names:
            assert re.search(rf"{group}:[^;]*`{name}`", tour), (group, name)
