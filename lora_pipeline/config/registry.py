"""The config registry: YAML files under configs/, one model (and one partition) each."""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
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


# Config files are small: a cap stops a huge or runaway file before YAML parses it.
MAX_CONFIG_BYTES = 1024 * 1024


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses YAML aliases: an alias bomb of a few hundred bytes expands to gigabytes
    (and --set copies the expansion), so config files are data without references."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"found the alias *{event.anchor}: YAML aliases (*name) are not accepted in configs; "
                "write the values out", event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """YAML text as plain data, aliases refused."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506  (a SafeLoader subclass)


def is_model_key(key: str) -> bool:
    """The one rule for model names: a partition key, a store path segment and a file name stem at once."""
    return bool(PARTITION_KEY_PATTERN.fullmatch(key)) and ".." not in key


def partition_key_for(path: Path) -> str:
    """The partition key of a config file: its file name without extension, checked to be path-safe."""
    key = path.stem
    if not is_model_key(key):
        raise ConfigError(
            f"{path}: the file name {key!r} is not a valid model key; use lowercase letters, digits, "
            "'.', '_' and '-', starting with a letter or digit, never '..' (it becomes a storage path and a "
            "partition key)"
        )
    return key


def _format_location(loc: Iterable[Any]) -> str:
    """A key path as the docs write it: dataset.sources[1].format."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _section_in(annotation: Any) -> Any:
    """The config section class an annotation holds, through Optional and list (Optional[list[DataSource]])."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return next((found for arg in typing.get_args(annotation) if (found := _section_in(arg)) is not None), None)


def _close_keys(loc: tuple) -> str:
    """', did you mean ...? (known here: ...)' for an unknown key at loc, from the schema's fields at its level."""
    model: Any = ModelConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation if part in getattr(model, "model_fields", {}) else None
        model = _section_in(annotation)
        if model is None:
            return ""
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return (f", did you mean '{close[0]}'?" if close else "") + f" (known here: {', '.join(known)})"


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
                problems.append(f"unknown key '{key}'{_close_keys(error['loc'])}")
            elif error["type"] == "missing" or error.get("input", ...) is None:
                # Dagster's Config turns absent fields into None before pydantic sees them.
                problems.append(f"missing key '{key}'")
            elif error["type"] == "value_error":
                # A rule across keys names them itself; the section it was given (a whole mapping) says nothing more.
                given = error.get("input")
                problems.append(f"'{key}': {error['msg'].removeprefix('Value error, ')}"
                                + ("" if isinstance(given, (dict, list)) else f" (got {given!r})"))
            else:
                problems.append(f"'{key}': {error['msg']} (got {error.get('input')!r})")
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def read_yaml(path: Path) -> dict:
    """Read a config file as plain data, with a clear error for missing files and bad YAML."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes is more than a config file may have ({MAX_CONFIG_BYTES:,})")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"))
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
            value = safe_yaml(raw_value) if raw_value.strip() else ""
        except yaml.composer.ComposerError as exc:
            raise ConfigError(f"--set {item!r}: {exc.problem}") from None
        except yaml.YAMLError:
            value = raw_value
        try:
            parts = key_parts(key.strip())
        except ConfigError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
        node = result
        for depth, part in enumerate(parts[:-1]):
            where = _format_location(parts[: depth + 1])
            if isinstance(part, int):  # a list entry, such as one of dataset.sources
                entries = len(node) if isinstance(node, list) else "no"
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(f"--set {item!r}: {where} is not there ({_format_location(parts[:depth])} has "
                                      f"{entries} entries)")
                child = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {item!r}: '{_format_location(parts[:depth])}' is a list; name an entry, "
                                      f"e.g. {_format_location(parts[:depth])}[0].{part}")
                child = node.setdefault(part, [] if isinstance(parts[depth + 1], int) else {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {item!r}: '{where}' is a value, not a section")
            node = child
        if isinstance(node, list) and not isinstance(parts[-1], int):
            raise ConfigError(f"--set {item!r}: '{_format_location(parts[:-1])}' is a list; name an entry, e.g. "
                              f"{_format_location(parts[:-1])}[0].{parts[-1]}")
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: set a key of an entry, e.g. dataset.sources[0].weight=2")
        node[parts[-1]] = value
    return result


def key_parts(path: str) -> list[str | int]:
    """A config key path as its parts: 'dataset.sources[1].weight' is ['dataset', 'sources', 1, 'weight']."""
    parts: list[str | int] = []
    for piece in path.split("."):
        name, *indices = piece.split("[")
        parts += [name] if name else []
        for index in indices:
            if not index.endswith("]") or not index[:-1].isdigit():
                raise ConfigError(f"{path!r}: a list entry is written name[N], e.g. dataset.sources[0].weight")
            parts.append(int(index[:-1]))
    return parts


def value_at(data: dict, path: str) -> Any:
    """The value at a config key path (lora.r, dataset.sources[1].weight) in config data."""
    for part in key_parts(path):
        data = data[part]
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


SWEEP_KEY = "sweep"
BLENDS_KEY = "blends"  # a sweep file's weighted blends of its variants, ranked beside them
BLEND_FIELDS = {"name", "combination", "weights", "density"}


def _variant_part(path: str, value: Any) -> str:
    name = path.rsplit(".", 1)[-1].lower()
    text = str(value).lower() if not isinstance(value, bool) else ("true" if value else "false")
    joined = f"{name}{text}" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{name}-{text}"
    return re.sub(r"[^a-z0-9._-]+", "_", joined)


def sweep_variants(data: dict, stem: str, origin: str) -> dict[str, dict] | None:
    """A sweep file's variants: {partition key: config data}, one per combination of the `sweep:` lists.

    `sweep:` maps dotted config keys to lists of values, e.g. {lora.r: [4, 16, 64], training.seed: [0, 1]};
    a variant's key is the file's key and each value, e.g. tiny-sweep.r4.seed1. None for a plain config.
    """
    import itertools

    grid = data.get(SWEEP_KEY)
    if grid is None:
        return None
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{origin}: '{SWEEP_KEY}' must map config keys to lists of values, e.g. lora.r: [4, 16, 64]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{origin}: '{SWEEP_KEY}.{key}' must be a non-empty list of values (got {values!r})")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{origin}: '{SWEEP_KEY}.{key}' lists a value twice")
    plain = {name: value for name, value in data.items() if name not in (SWEEP_KEY, BLENDS_KEY)}
    variants = {}
    for combination in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combination))
        key = ".".join([stem, *(_variant_part(path, value) for path, value in chosen.items())])
        overrides = [f"{path}={json.dumps(value)}" for path, value in chosen.items()]
        variants[key] = apply_overrides(plain, overrides)
    return variants


@dataclass(frozen=True)
class RegisteredModel:
    """A config file known to the registry; for a sweep file, one of its variants."""

    key: str
    path: Path
    sweep: str | None = None


class ConfigRegistry:
    """The model configs one code location serves: the YAML files of a folder, plus extra files."""

    def __init__(self, config_dir: Path | None = None, extra_files: Iterable[Path] = ()) -> None:
        self.config_dir = (config_dir or default_config_dir()).resolve()
        entries: dict[str, RegisteredModel] = {}
        paths = sorted(self.config_dir.glob("*.yaml")) if self.config_dir.is_dir() else []
        self._variants: dict[str, dict] = {}
        # A file of the folder that cannot be a model (a bad name, unreadable YAML, an alias bomb) is reported
        # here and left out, so one bad file never stops the others; a file asked for by name still raises.
        self.problems: dict[Path, str] = {}
        extra = [Path(p).resolve() for p in extra_files]
        for path in [*paths, *extra]:
            try:
                key = partition_key_for(path)
                data = read_yaml(path)
            except ConfigError as problem:
                if path in extra:
                    raise
                self.problems[path] = str(problem)
                continue
            variants = sweep_variants(data, key, str(path)) if SWEEP_KEY in data else None
            for entry_key in variants or [key]:
                known = entries.get(entry_key)
                if known is not None and known.path != path:
                    raise ConfigError(
                        f"{path}: model key {entry_key!r} is already used by {known.path}; rename one of the files"
                    )
                entries[entry_key] = RegisteredModel(key=entry_key, path=path, sweep=key if variants else None)
            self._variants.update(variants or {})
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
        """The partition's config as plain data: its file, or for a sweep variant, the file with the variant's values."""
        path = self.path_of(key)
        return self._variants[key] if key in self._variants else read_yaml(path)

    def raw_file(self, key: str) -> dict:
        """The partition's config file as plain data, as written (a sweep variant's: the whole sweep file)."""
        return read_yaml(self.path_of(key))

    def load(self, key: str) -> ModelConfig:
        """The partition's validated config."""
        return validate_config(self.raw(key), str(self.path_of(key)) + (f" (variant {key})" if key in self._variants else ""))

    def sweep_of(self, key: str) -> str | None:
        """The sweep a partition is a variant of, or None."""
        entry = self._entries.get(key)
        return entry.sweep if entry is not None else None

    def variants_of(self, sweep: str) -> list[str]:
        """The partition keys of a sweep's variants, in the file's order."""
        return [entry.key for entry in self._entries.values() if entry.sweep == sweep]


def load_config_file(path: Path, overrides: Iterable[str] = ()) -> ModelConfig:
    """Validate one YAML file with overrides applied; errors name the file and the key."""
    overrides = list(overrides)
    data = apply_overrides(read_yaml(path), overrides)
    origin = f"{path}" + (" (with --set overrides)" if overrides else "")
    if SWEEP_KEY in data:
        raise ConfigError(f"{origin}: is a sweep file (it has '{SWEEP_KEY}:'); this command takes one model config")
    return validate_config(data, origin)


def sweep_blends(data: dict, variants: Iterable[str], origin: str) -> list[dict]:
    """A sweep file's `blends:` list, checked: each {name, combination, weights: {variant: weight}, density?}.

    A blend is PEFT's add_weighted_adapter of the variants' adapters; the leaderboard scores it beside them.
    """
    blends = data.get(BLENDS_KEY) or []
    known = list(variants)
    if not isinstance(blends, list):
        raise ConfigError(f"{origin}: '{BLENDS_KEY}' must be a list of {{name, combination, weights}}")
    names = set()
    for index, blend in enumerate(blends):
        where = f"{origin}: '{BLENDS_KEY}[{index}]'"
        if not isinstance(blend, dict) or not {"name", "weights"} <= set(blend) or set(blend) - BLEND_FIELDS:
            raise ConfigError(f"{where} needs name and weights (and may have combination, density), got {blend!r}")
        if not PARTITION_KEY_PATTERN.fullmatch(str(blend["name"])) or blend["name"] in names or blend["name"] in known:
            raise ConfigError(f"{where}: name {blend['name']!r} must be a new plain name ([a-z0-9._-])")
        names.add(blend["name"])
        weights = blend["weights"]
        if not isinstance(weights, dict) or len(weights) < 2:
            raise ConfigError(f"{where}.weights must map two or more variants to weights, e.g. {{{known[0]}: 0.5, ...}}")
        unknown = [key for key in weights if key not in known]
        if unknown:
            raise ConfigError(f"{where}.weights: {unknown[0]!r} is not a variant of this sweep ({', '.join(known)})")
    return blends


def load_sweep_file(path: Path, overrides: Iterable[str] = ()) -> dict[str, ModelConfig] | None:
    """A sweep file's validated variants {partition key: config} (overrides applied to each), or None for a plain config."""
    overrides = list(overrides)
    data = apply_overrides(read_yaml(path), overrides)
    variants = sweep_variants(data, partition_key_for(path), str(path))
    if variants is None:
        return None
    sweep_blends(data, variants, str(path))
    return {key: validate_config(variant, f"{path} (variant {key})") for key, variant in variants.items()}
