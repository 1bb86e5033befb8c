"""Where every stage is declared: the `stage` decorator, and the pipeline's order read from Dagster's graph.

A stage says everything about itself in its decorator, beside its body: its group, its code
version, what it reads besides its parent assets (`Reads`) and whether it runs on the GPU. Its
parents are its function's asset parameters, as Dagster reads them; the pipeline order is that
graph sorted. The versions (provenance.py), the settings assets (settings.py), the sensors and the
CLI all read these declarations, so adding a stage is one new module in this package.

Glossary of the versions, used everywhere in this package:
- settings version (of a stage): a hash of what the stage reads besides its parents: its `Reads`
  part of the config, the library versions and, if it reads the dataset source itself, the
  source version. "Settings" means this, and the <stage>_settings assets that report it.
- source version: the dataset source's content (file bytes, S3 ETags, hub commit).
- code version: the decorator's `code_version`; bump it when the stage's code changes its output.
- stage version: a hash of the stage's code version, settings version and its parents' stage
  versions; the asset's Dagster data version. Equal stage versions mean equal outputs, which is how
  `lora-pipeline run`, `list`, the sensors and schedules decide what to redo.
- settings-asset version: what <stage>_settings reports: the settings and code versions of the
  stage and of every stage before it, so the UI marks at once every stage a run would redo.
- training inputs key: trained_adapter's reuse and checkpoint key; it hashes the bytes training
  reads rather than the parents' versions, so a parent re-made with equal bytes reuses the adapter.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import dagster as dg

from lora_pipeline.config.preference import PreferenceSettings
from lora_pipeline.config.registry import value_at
from lora_pipeline.hashing import folder_fingerprint
from lora_pipeline.ml.base.quantize import quant_storage_name
from lora_pipeline.ml.base.tiny import BUILTIN_PREFIX, BUILTIN_REVISION
from lora_pipeline.ml.data.formatted import overlong_policy

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig

# Order of the groups in the pipeline; stages that do not depend on each other run in this order.
GROUPS = ("data", "model", "evaluation", "decision")
SETTINGS_GROUP = "settings"


# Config keys added after models were trained, with the default that behaves as before: while a key
# holds it, it is left out of the hashed settings, so upgrading does not redo every existing model.
ADDED_LATER = {
    "lora.use_dora": False,
    "training.padding_free": True,
    "training.attention": "auto",
    "training.dequant_cache": "auto",
    "training.liger_kernel": False,
    "dataset.turn_flag_field": None,
    "dataset.turns": "auto",
    "dataset.reasoning": "auto",
    "dataset.unrenderable": "refuse",
    "dataset.max_unrenderable_rate": 0.05,
    "dataset.follow_symlinks": False,
    "dataset.sources": None,
    "dataset.mix_seed": 0,
    "quantization.quant_storage": "uint8",
    "training.distributed": {"strategy": "auto", "nproc_per_node": "auto", "nnodes": 1},
    "training.objective": "sft",
    "training.init_adapter": None,
    "preference": PreferenceSettings().model_dump(mode="json"),
    "preference.beta": PreferenceSettings().beta,
    "training.eval_steps": 0,
    "training.early_stopping_patience": 0,
    "training.early_stopping_threshold": 0.0,
    "training.keep_best": False,
}


# Config values that took a new meaning after models were trained: hashed as the value that made the same
# output before, so upgrading redoes nothing it need not. `dataset.overlong: auto` truncates as the old
# default did, except a text-format corpus, whose documents it now splits (those are redone).
RESPELLED = {
    "dataset.overlong": lambda data: overlong_policy(data["dataset"]["overlong"], data["dataset"]["format"]),
    # 'auto' stores 4-bit weights as uint8, as before the key existed, except under FSDP.
    "quantization.quant_storage": lambda data: quant_storage_name(
        data["quantization"]["quant_storage"], "compute_dtype", data["training"]["distributed"]["strategy"]),
}


def settings_key(stage: str) -> dg.AssetKey:
    """The key of the stage's settings asset (<stage>_settings), an input of the stage."""
    return dg.AssetKey(f"{stage}_settings")


@dataclass(frozen=True)
class Reads:
    """What a stage reads besides its parent assets; part of its settings version.

    config: dotted config paths (`training.max_length`, a whole section `lora`); in the hashed
    payload each is keyed by its last part. ignoring: paths under those that do not change what the
    stage makes (how often it saves or logs; under a list of sections such as dataset.sources, the
    key in each). source: whether it reads the dataset source's content
    itself (a callable when that depends on the config); with_source: config paths read only then.
    """

    config: tuple[str, ...]
    ignoring: tuple[str, ...] = ()
    source: bool | Callable[["ModelConfig"], bool] = False
    with_source: tuple[str, ...] = ()

    def reads_source(self, model_config: "ModelConfig") -> bool:
        """Whether the stage reads the dataset source's content for this config."""
        return self.source(model_config) if callable(self.source) else self.source

    def of(self, model_config: "ModelConfig") -> dict:
        """The part of the config the stage reads (so a change elsewhere leaves its version alone)."""
        data = model_config.model_dump(mode="json")
        for path, hashed_as in RESPELLED.items():
            section, key = path.split(".")
            data[section][key] = hashed_as(data)
        if data["base_model"].startswith(BUILTIN_PREFIX):  # what the builder makes is part of the base
            data["base_model"] += f"@r{BUILTIN_REVISION}"
        elif Path(data["base_model"]).is_dir():  # a local folder is its files, not its path: new weights redo
            data["base_model"] += f"@{folder_fingerprint(data['base_model'])}"
        paths = self.config + (self.with_source if self.reads_source(model_config) else ())
        unchanged = tuple(key for key, default in ADDED_LATER.items() if value_at(data, key) == default)
        # A key added later and read on its own is left out at its default, as it was before it existed.
        return {path.split(".")[-1]: _without(value_at(data, path), path, self.ignoring + unchanged)
                for path in paths if path not in unchanged}

    def describe(self) -> str:
        """The same in words, for the UI."""
        words = ", ".join(self.config)
        if self.ignoring:
            words += f" (but {', '.join(self.ignoring)}, which do not change what it makes)"
        if self.source is True:
            words += ", the dataset source's content version (file bytes, S3 ETags, hub commit)"
        elif self.source:
            extra = f" and {', '.join(self.with_source)}" if self.with_source else ""
            words += f"; for a built-in base, whose tokenizer is trained on the data, the source's content version{extra}"
        return words


def _without(value, path: str, ignoring: tuple[str, ...]):
    """value (the config at path) without the ignored paths under it, at any depth: `dataset.sources.weight`
    leaves weight out of every entry of dataset.sources, whether the stage reads dataset.sources or dataset."""
    drop = {ignored.removeprefix(path + ".") for ignored in ignoring if ignored.startswith(path + ".")}
    if not drop or value is None:
        return value
    if isinstance(value, list):  # a list of sections (dataset.sources): the same keys left out of each
        return [_without(item, path, ignoring) for item in value]
    return {key: _without(inner, f"{path}.{key}", ignoring) if any(d.startswith(key + ".") for d in drop) else inner
            for key, inner in value.items() if key not in drop}


@dataclass(frozen=True)
class Stage:
    """One stage as declared: its name, group, code version, what it reads, and (once known) its parents."""

    name: str
    group: str
    code_version: str
    reads: Reads
    parents: tuple[str, ...] = field(default=())


# Filled by the `stage` decorator as the asset modules are imported.
_DECLARED: dict[str, tuple[Stage, dg.AssetsDefinition]] = {}


def declare(stage_spec: Stage, definition: dg.AssetsDefinition) -> None:
    """Record a stage declared with the `stage` decorator."""
    if stage_spec.group not in GROUPS:
        raise ValueError(f"stage {stage_spec.name}: group {stage_spec.group!r} is not one of {GROUPS}")
    _DECLARED[stage_spec.name] = (stage_spec, definition)
    pipeline.cache_clear()


@functools.cache
def pipeline() -> dict[str, Stage]:
    """Every stage, in pipeline order (parents first; independent stages by group, then name), with its parents."""
    import lora_pipeline.assets  # noqa: F401  (declares every stage)

    parents = {
        name: tuple(sorted(key.path[-1] for key in definition.asset_deps[definition.key]
                           if key.path[-1] in _DECLARED))
        for name, (_, definition) in _DECLARED.items()
    }
    ordered: dict[str, Stage] = {}
    while len(ordered) < len(_DECLARED):
        ready = [name for name in _DECLARED if name not in ordered and all(p in ordered for p in parents[name])]
        if not ready:
            raise ValueError(f"the stages {sorted(set(_DECLARED) - set(ordered))} depend on each other in a cycle")
        name = min(ready, key=lambda n: (GROUPS.index(_DECLARED[n][0].group), n))
        spec = _DECLARED[name][0]
        ordered[name] = Stage(spec.name, spec.group, spec.code_version, spec.reads, parents[name])
    return ordered


def stage_names() -> list[str]:
    """The stages' names in pipeline order."""
    return list(pipeline())


def definitions() -> list[dg.AssetsDefinition]:
    """The stages' asset definitions in pipeline order."""
    return [_DECLARED[name][1] for name in pipeline()]


def upstream_stages(name: str) -> list[str]:
    """The stages before `name` (its parents, theirs, ...), in pipeline order."""
    stages = pipeline()
    found: set[str] = set()
    pending = list(stages[name].parents)
    while pending:
        parent = pending.pop()
        if parent not in found:
            found.add(parent)
            pending += stages[parent].parents
    return [stage for stage in stages if stage in found]
