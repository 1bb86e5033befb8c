"""The config registry: YAML files under configs/, one model (and one partition) each."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pydantic
import yaml

from lora_pipeline.config.schema import ModelConfig
from lora_pipeline.errors import ConfigError

PARTITION_KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
CONFIG_DIR_ENV = "LORA_PIPELINE_CONFIG_DIR"


def default_config_dir() -> Path:
    """configs/ in the working directory, unless LORA_PIPELINE_CONFIG_DIR names another folder."""
    return Path(os.environ.get(CONFIG_DIR_ENV, "configs")).resolve()


def partition_key_for(path: Path) -> str:
    """The partition key of a config file: its file name without extension, checked to be path-safe."""
    key = path.stem
    if not PARTITION_KEY_PATTERN.fullmatch(key):
        raise ConfigError(
            f"{path}: the file name {key!r} is not a valid model key; use lowercase letters, digits, "
            "'.', '_' and '-' (it becomes a storage path and a partition key)"
        )
    return key


def _format_location(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def validate_config(data: Any, origin: str) -> ModelConfig:
    """Validate plain data against the schema; errors name the origin and every offending key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of config keys, found {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = _format_location(error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown key '{key}'")
            elif error["type"] == "missing" or error.get("input", ...) is None:
                # Dagster's Config turns absent fields into None before pydantic sees them.
                problems.append(f"missing key '{key}'")
            else:
                problems.append(f"'{key}': {error['msg']} (got {error.get('input')!r})")
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def read_yaml(path: Path) -> dict:
    """Read a config file as plain data, with a clear error for missing files and bad YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply `key.path=value` overrides (values parsed as YAML) to a copy of the config data."""
    result = _deep_copy(data)
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example lora.r=8")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else ""
        except yaml.YAMLError:
            value = raw_value
        parts = key.strip().split(".")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {item!r}: '{'.'.join(parts[: depth + 1])}' is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


@dataclass(frozen=True)
class RegisteredModel:
    """A config file known to the registry."""

    key: str
    path: Path


class ConfigRegistry:
    """The model configs one code location serves: the YAML files of a folder, plus extra files."""

    def __init__(self, config_dir: Path | None = None, extra_files: Iterable[Path] = ()) -> None:
        self.config_dir = (config_dir or default_config_dir()).resolve()
        entries: dict[str, RegisteredModel] = {}
        paths = sorted(self.config_dir.glob("*.yaml")) if self.config_dir.is_dir() else []
        for path in [*paths, *(Path(p).resolve() for p in extra_files)]:
            key = partition_key_for(path)
            known = entries.get(key)
            if known is not None and known.path != path:
                raise ConfigError(
                    f"{path}: model key {key!r} is already used by {known.path}; rename one of the files"
                )
            entries[key] = RegisteredModel(key=key, path=path)
        self._entries = entries

    @property
    def keys(self) -> list[str]:
        """Partition keys, sorted."""
        return sorted(self._entries)

    def path_of(self, key: str) -> Path:
        """The YAML file of a partition key."""
        try:
            return self._entries[key].path
        except KeyError:
            raise ConfigError(
                f"no config for model {key!r} in {self.config_dir}; known models: {', '.join(self.keys) or 'none'}"
            ) from None

    def raw(self, key: str) -> dict:
        """The partition's config file as plain data."""
        return read_yaml(self.path_of(key))

    def load(self, key: str) -> ModelConfig:
        """The partition's validated config."""
        path = self.path_of(key)
        return validate_config(read_yaml(path), str(path))


def load_config_file(path: Path, overrides: Iterable[str] = ()) -> ModelConfig:
    """Validate one YAML file with overrides applied; errors name the file and the key."""
    overrides = list(overrides)
    data = apply_overrides(read_yaml(path), overrides)
    origin = f"{path}" + (" (with --set overrides)" if overrides else "")
    return validate_config(data, origin)
