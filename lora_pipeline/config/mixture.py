"""`dataset.sources`: several datasets mixed into one training set, each read with its own settings.

A mixture is the one-source dataset section repeated per source: every per-source key left out takes the
dataset-level value (dataset.format, dataset.columns, ...), so each source reads exactly as a config with
`dataset.source` set to it would. What a source adds is its name and how much of it is trained on
(weight or train_rows); ml/data/mixture.py does the mixing.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Literal, Optional

import pydantic
from pydantic import Field

from lora_pipeline.config.base import StrictSection

if TYPE_CHECKING:
    from lora_pipeline.config.dataset import DatasetSettings

DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "kto"]
# Preference rows are rendered with the starting adapter's template and split by prompt: not mixed (yet).
UNMIXED_FORMATS = ("preference", "kto")
# Source names become folder names in the raw_dataset artifact and values of the formatted splits' `source`.
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The keys a source shares with the dataset section (left out: the dataset's value).
SHARED_KEYS = ("format", "columns", "split", "subset", "revision", "system_prompt", "max_rows")


class DataSource(StrictSection):
    """One source of a mixture: where its rows come from, how they are read, and how much of it is trained on."""

    source: str = Field(
        description="This source's data, written as dataset.source is: a local file, folder or glob, an fsspec URL, "
        "or a hub dataset as 'hf:owner/name'.",
    )
    name: Optional[str] = Field(
        default=None,
        description="The source's name in the formatted_dataset metadata, in the formatted splits' 'source' column "
        "and in the per-source held-out loss of eval_report: letters, digits, '.', '_' and '-'. Default: the "
        "file or hub dataset name without its extension ('sample_chats' for data/sample_chats.jsonl).",
    )
    # A str rather than the Literal: Dagster's config types take a Literal only as a field's whole type.
    format: Optional[str] = Field(
        default=None, description="This source's row format, as dataset.format (auto, alpaca, sharegpt, messages, "
        "prompt_completion, text); default: dataset.format."
    )
    columns: Optional[dict[str, str]] = Field(
        default=None, description="This source's column mapping, as dataset.columns; default: dataset.columns."
    )
    split: Optional[str] = Field(default=None, description="Hub split to read; default: dataset.split.")
    subset: Optional[str] = Field(default=None, description="Hub subset to read; default: dataset.subset.")
    revision: Optional[str] = Field(default=None, description="Hub revision to read; default: dataset.revision.")
    system_prompt: Optional[str] = Field(
        default=None,
        description="System prompt added to this source's examples that have none of their own; default: "
        "dataset.system_prompt. The template itself is dataset.template, one for the whole mixture: it is the "
        "model's prompt format.",
    )
    max_rows: Optional[int] = Field(
        default=None,
        ge=1,
        description="Read at most this many rows of this source (the first ones), before cleaning; default: "
        "dataset.max_rows. A cheap cap for a smoke test; to sample rows, use weight or train_rows.",
    )
    weight: Optional[float] = Field(
        default=None,
        gt=0.0,
        description="How many times each of this source's training rows is trained on, on average. 1 (the default): "
        "every row once. Below 1: that share of its rows, drawn without replacement (0.25: a quarter of them). "
        "Above 1: every row repeated (2: twice; 2.5: twice, and half of them, drawn, a third time). Only training "
        "rows are sampled or repeated, after cleaning and after the train/eval split: every held-out row of every "
        "source is in the eval split once, so a repeated row never straddles the split and a new weight leaves "
        "the held-out examples as they were. The draw is deterministic: a row is kept by a hash of its content "
        "and dataset.mix_seed, so the same config and data give the same mixture, and editing one source "
        "changes only that source's rows in it.",
    )
    train_rows: Optional[int] = Field(
        default=None,
        ge=1,
        description="Instead of weight: how many training rows this source contributes to the mixture. Fewer than "
        "it has: drawn without replacement; more: its rows repeated, as weight = train_rows / its training rows "
        "would. Held-out rows are neither counted nor repeated.",
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _template_is_the_models(cls, data: object) -> object:
        if isinstance(data, dict) and "template" in data:
            raise ValueError("a source has no template of its own: the template is the model's prompt format, one "
                             "for every source (text sources are rendered plain); set dataset.template")
        return data

    @pydantic.field_validator("format")
    @classmethod
    def _a_known_format(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in typing.get_args(DataFormat):
            raise ValueError(f"{value!r} is not a row format; use one of "
                             f"{', '.join(f for f in typing.get_args(DataFormat) if f not in UNMIXED_FORMATS)}")
        return value

    @pydantic.model_validator(mode="after")
    def _one_share(self) -> "DataSource":
        if self.weight is not None and self.train_rows is not None:
            raise ValueError(f"{self.source}: give weight or train_rows, not both")
        if self.format in UNMIXED_FORMATS:
            raise ValueError(f"{self.source}: {self.format} rows cannot be mixed (preference tuning takes one "
                             "dataset.source)")
        if self.name is not None and not SOURCE_NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_' and '-', starting with a letter "
                             "or digit")
        return self


def default_source_name(source: str) -> str:
    """A source's name when none is given: its file, folder or hub dataset name without extensions."""
    path = source.strip().removeprefix("hf:").removeprefix("file://").rstrip("/")
    parts = [part for part in PurePosixPath(path.replace("\\", "/")).parts if not set("*?[") & set(part)]
    last = parts[-1] if parts else "source"
    stem = last.split(".", 1)[0] if not last.startswith(".") else last.lstrip(".")
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return cleaned or "source"


@dataclass(frozen=True)
class MixedSource:
    """One source of a mixture with the dataset-level defaults filled in."""

    index: int
    name: str
    dataset: "DatasetSettings"  # this source as a one-source dataset section: what reads and formats it
    weight: Optional[float]
    train_rows: Optional[int]

    @property
    def key(self) -> str:
        """Where it is in the config, as errors name it: dataset.sources[1]."""
        return f"dataset.sources[{self.index}]"

    @property
    def share(self) -> str:
        """How much of it is trained on, in words for the metadata: 'weight 0.5', '300 rows', 'weight 1'."""
        return f"{self.train_rows} rows" if self.train_rows is not None else f"weight {self.weight or 1:g}"


def mixed_sources(dataset: "DatasetSettings") -> list[MixedSource]:
    """dataset.sources with each source's unset keys taken from the dataset section; names checked to be distinct."""
    mixed: list[MixedSource] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(dataset.sources or []):
        name = entry.name or default_source_name(entry.source)
        if name in seen:
            raise ValueError(f"dataset.sources[{index}] and dataset.sources[{seen[name]}] are both named {name!r}; "
                             f"give each a distinct name (dataset.sources[{index}].name)")
        seen[name] = index
        given = {key: value for key in SHARED_KEYS if (value := getattr(entry, key)) is not None}
        one = dataset.model_copy(update={"source": entry.source, "sources": None, **given})
        mixed.append(MixedSource(index, name, one, entry.weight, entry.train_rows))
    return mixed
