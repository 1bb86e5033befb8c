"""The starting adapter of a preference model (training.init_adapter): another model's current champion.

The edge crosses partitions, which Dagster's asset graph cannot draw (the same assets would depend on
themselves), so it is kept here instead: the starting champion's version is part of this model's source
version, so a new champion there makes this model stale (the sensors and `lora-pipeline list` see it, and
a run redoes what it must); quantized_base copies that champion's base, so the adapter starts on the
weights it was trained against; and every stage that uses it records which champion it was.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.config.schema import ModelConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.resources.artifacts import MANIFEST, ArtifactRef
from lora_pipeline.resources.records import ChampionHistory
from lora_pipeline.resources.storage import ArtifactStore

BASE_INFO = "base_info.json"
LINEAGE = "LINEAGE.json"


@dataclass(frozen=True)
class StartingAdapter:
    """Another model's champion a preference run starts from: its adapter and the base it was trained on."""

    model: str
    version: str
    adapter: ArtifactRef
    quantized_base: ArtifactRef

    def describe(self) -> str:
        """'<model> champion <version>', as logs and metadata say it."""
        return f"{self.model} champion {self.version}"

    def as_entry(self) -> dict:
        """What the lineage records of it."""
        return {"model": self.model, "version": self.version, "uri": self.adapter.uri, "sha256": self.adapter.sha256}


def starting_adapter(storage: ArtifactStore, model_config: ModelConfig, partition: str) -> StartingAdapter | None:
    """The current champion of training.init_adapter's model, or None when the config has no starting adapter."""
    name = model_config.training.init_adapter
    if name is None:
        return None
    if name == partition:
        raise ConfigError(f"training.init_adapter names model {partition!r} itself; name the model to start from "
                          "(an SFT model's key)")
    event = ChampionHistory(storage, name).current()
    if event is None:
        raise ConfigError(f"training.init_adapter: model {name!r} has no champion in the store {storage.root} yet; "
                          f"run it first (`lora-pipeline run configs/{name}.yaml`) so a champion is promoted")
    return StartingAdapter(name, event.version, ArtifactRef.from_entry(event.candidate["trained_adapter"]),
                           ArtifactRef.from_entry(event.candidate["quantized_base"]))


def starting_version(storage: ArtifactStore, model_config: ModelConfig) -> str | None:
    """The version of the starting champion (None without training.init_adapter; 'none' before it has one)."""
    name = model_config.training.init_adapter
    if name is None:
        return None
    event = ChampionHistory(storage, name).current()
    return event.version if event is not None else "none"


def model_source_version(model_config: ModelConfig, storage: ArtifactStore | str | None) -> str:
    """What the model learns from, as a version: the dataset source's content and, with training.init_adapter,
    the starting champion's version (a new champion there is new input here). storage: the store, or its root
    (the CLI's --storage); None: the deployment's ($LORA_PIPELINE_STORAGE or ./artifacts)."""
    from lora_pipeline.ml.data.raw import dataset_source_version

    version = dataset_source_version(model_config.dataset)
    if model_config.training.init_adapter is None:
        return version
    if not isinstance(storage, ArtifactStore):
        from lora_pipeline.resources.factory import default_resources

        storage = default_resources(storage_root=storage)["storage"]
    return f"{version}+{model_config.training.init_adapter}@{starting_version(storage, model_config)}"


def require_same_base(start: StartingAdapter, storage: ArtifactStore, model_config: ModelConfig) -> Path:
    """The starting champion's quantized base folder, after checking it is the base this config asks for."""
    folder = storage.local_path(start.quantized_base)
    import json

    info = json.loads((folder / BASE_INFO).read_text(encoding="utf-8"))
    asked = {"base_model": model_config.base_model, "revision": model_config.base_revision,
             "quantization": model_config.quantization.mode}
    differs = [f"{key} {info.get(key)!r} there, {value!r} here" for key, value in asked.items() if info.get(key) != value]
    if differs:
        raise ConfigError(f"training.init_adapter: the {start.describe()} was trained on another base ("
                          f"{'; '.join(differs)}); an adapter only means something on its own base, so set "
                          "base_model, base_revision and quantization.mode as that model has them")
    return folder


def copy_starting_base(start: StartingAdapter, storage: ArtifactStore, model_config: ModelConfig,
                       staging: Path) -> dict:
    """Copy the starting champion's quantized base into staging (its lineage is this stage's own); its base info."""
    import json

    folder = require_same_base(start, storage, model_config)
    for item in folder.iterdir():
        if item.name in (LINEAGE, MANIFEST):  # the copy is published with its own
            continue
        target = staging / item.name
        shutil.copytree(item, target) if item.is_dir() else shutil.copy2(item, target)
    return json.loads((folder / BASE_INFO).read_text(encoding="utf-8"))
