"""The config schema, the shipped configs and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.config.registry import (
    ConfigRegistry,
    apply_overrides,
    load_config_file,
    partition_key_for,
    validate_config,
)
from lora_pipeline.errors import ConfigError

from conftest import REPO, micro_config_data

SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_the_expected_configs_are_shipped():
    names = {path.stem for path in SHIPPED}
    assert {
        "tiny-demo", "llama-3.1-8b-qlora", "mistral-7b-qlora", "qwen2.5-7b-lora", "phi-3-mini-lora", "gpt2-lora",
        "recipe-parity",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path: Path):
    from lora_pipeline.config.registry import load_sweep_file

    configs = list((load_sweep_file(path) or {path.stem: load_config_file(path)}).values())
    assert partition_key_for(path) == path.stem
    assert all(config.base_model and (config.dataset.source or config.dataset.sources) for config in configs)


def test_unknown_key_is_rejected_with_its_path():
    data = micro_config_data(lora={"rank": 4})
    with pytest.raises(ConfigError, match=r"x.yaml: unknown key 'lora.rank' \(known here: r, alpha, dropout,"):
        validate_config(data, "x.yaml")


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("lora", {"r": 0}, "lora.r"),
        ("lora", {"alpha": 0}, "lora.alpha"),
        ("lora", {"dropout": 1.0}, "lora.dropout"),
        ("quantization", {"mode": "nf3"}, "quantization.mode"),
        ("training", {"optimizer": "adam9000"}, "training.optimizer"),
        ("dataset", {"eval_fraction": 0}, "dataset.eval_fraction"),
    ],
)
def test_out_of_range_values_name_the_key(section, values, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        validate_config(micro_config_data(**{section: values}), "x.yaml")


def test_missing_required_keys_are_named():
    data = micro_config_data()
    del data["dataset"]["source"]
    with pytest.raises(ConfigError, match=r"missing key 'dataset.source'"):
        validate_config(data, "x.yaml")


def test_target_modules_accepts_auto_a_name_list_or_a_comma_string():
    assert validate_config(micro_config_data(), "x").lora.target_modules == ["auto"]
    config = validate_config(micro_config_data(lora={"target_modules": "q_proj, v_proj"}), "x")
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="cannot be combined"):
        validate_config(micro_config_data(lora={"target_modules": ["auto", "q_proj"]}), "x")


def test_overrides_set_nested_keys_with_yaml_typed_values():
    data = apply_overrides(micro_config_data(), ["lora.r=4", "training.packing=true", "base_model=/models/x"])
    config = validate_config(data, "x")
    assert (config.lora.r, config.training.packing, config.base_model) == (4, True, "/models/x")


def test_a_bad_override_names_itself():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["lora.r"])
    with pytest.raises(ConfigError, match="'base_model' is a value, not a section"):
        apply_overrides({"base_model": "x"}, ["base_model.name=y"])


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base_model: x\ndataset: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line \d+"):
        load_config_file(path)


def test_partition_keys_must_be_path_safe(tmp_path):
    with pytest.raises(ConfigError, match="not a valid model key"):
        partition_key_for(tmp_path / "My Model.yaml")


def test_config_hash_ignores_key_order_but_not_values():
    first = validate_config(micro_config_data(), "x")
    reordered = validate_config(dict(reversed(list(micro_config_data().items()))), "x")
    changed = validate_config(micro_config_data(lora={"r": 4}), "x")
    assert first.canonical_hash() == reordered.canonical_hash() != changed.canonical_hash()


def test_registry_refuses_two_files_with_one_key(tmp_path, write_config):
    write_config("micro")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "micro.yaml").write_text((tmp_path / "configs" / "micro.yaml").read_text())
    with pytest.raises(ConfigError, match="already used by"):
        ConfigRegistry(tmp_path / "configs", extra_files=[other / "micro.yaml"])
