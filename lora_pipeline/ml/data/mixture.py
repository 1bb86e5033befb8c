"""Mixtures (dataset.sources): what a mixture is made of and how its sources are read, versioned, cleaned
and templated; mixing.py samples, repeats and interleaves them. Dagster-free.

The order of things, and why:
1. Each source is read, cleaned and split train/eval by content hash on its own (raw.py, clean.py), and
   formatted with its own format and system prompt under the mixture's one template (`mixture_templates`).
2. Only then are training rows sampled or repeated (mixing.py): a held-out row is never repeated and
   never dropped, so no copy of a row can straddle the split, and changing a weight leaves the eval
   split, and so the scores cached on it, as they were.
3. Which rows a weight keeps is decided by a hash of each row's content and dataset.mix_seed, not by
   its position or by the other sources: the same config and data give the same mixture, and editing
   one source changes only that source's rows in it.

A "row" here is a source row that gave training examples; its examples (one per learned turn, or the
blocks of a split document) travel together and stay in order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from lora_pipeline.errors import ConfigError, LoraPipelineError
from lora_pipeline.ml.data.clean import (
    TOKENIZER_CORPUS_ROWS,
    CleanedRows,
    clean_rows,
    require_both_splits,
    tokenizer_corpus,
)
from lora_pipeline.ml.data.formatted import FormatSettings
from lora_pipeline.ml.data.raw import LoadedDataset, load_dataset
from lora_pipeline.ml.data.templates import resolve_template
from lora_pipeline.ml.preference.formats import PREFERENCE_FORMATS

SOURCE_COLUMN = "source"
# Bump when reading a source gives other rows for the same data and settings (invalidates the reuse of raw rows).
READER_VERSION = "1"
# The settings of a one-source dataset section that decide which rows reading it gives.
READ_SETTINGS = ("source", "format", "columns", "split", "subset", "revision", "max_rows", "turn_flag_field",
                 "follow_symlinks")


@dataclass
class SourceToFormat:
    """One cleaned source of a mixture, with how it is formatted and how much of it is trained on."""

    name: str
    key: str  # where the config sets it, e.g. dataset.sources[1]
    cleaned: CleanedRows
    settings: FormatSettings  # this source's template setting and system prompt
    weight: float | None = None
    train_rows: int | None = None


def mixture_version(versions: dict[str, str]) -> str:
    """The mixture's source version, from each source's (name -> content version): any source's change changes it."""
    return hashlib.sha256(json.dumps(list(versions.items())).encode()).hexdigest()[:16]


def read_key(settings, version: str) -> str:
    """What reading one source gives depends on: its content version and its read settings. Raw rows stored under
    an equal key are those rows, so they are reused instead of read again."""
    payload = {"version": version, "reader": READER_VERSION,
               **{name: getattr(settings, name, None) for name in READ_SETTINGS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def prompt_format(formats: list[str]) -> str:
    """The row format whose template renders every source that has prompts (what travels with the model): their
    format when they share one, else 'messages' (any rows with turns render as a chat); 'text' when all are text."""
    prompted = {fmt for fmt in formats if fmt != "text"}
    if not prompted:
        return "text"
    return prompted.pop() if len(prompted) == 1 else "messages"


def mixture_templates(setting: str, formats: dict[str, str], keys: dict[str, str],
                      tokenizer_template: str | None) -> tuple[dict[str, str], str]:
    """Per source, the dataset.template setting it is formatted with, and the mixture's prompt format.

    A model has one prompt format: every source with prompts is rendered with one template, and text sources
    (which have no prompt) plain. 'auto' for sources of different formats is a chat template (the tokenizer's,
    else ChatML); a non-chat template cannot render different formats alike and is refused.
    """
    shared = prompt_format(list(formats.values()))
    chosen = setting
    if setting.strip() == "auto" and shared == "messages":
        chosen = "tokenizer" if tokenizer_template else "chatml"
    resolved = {}
    for name, fmt in formats.items():
        if fmt == "text":
            continue
        try:
            resolved[name] = resolve_template(chosen, fmt, tokenizer_template)
        except ConfigError as exc:
            raise ConfigError(f"{keys[name]} ({name}, {fmt} rows): {exc}") from None
    distinct = {(template.name, template.jinja) for template in resolved.values()}
    if len(distinct) > 1 or (resolved and shared == "messages" and not next(iter(resolved.values())).is_chat):
        listed = ", ".join(f"{name} ({formats[name]})" for name in resolved)
        raise ConfigError(f"dataset.template {setting!r} renders the sources {listed} in different prompt formats, "
                          "and a model has one: use 'auto' (a chat for every source), 'chatml', 'tokenizer' or a "
                          "Jinja template")
    return {name: (chosen if fmt != "text" else "plain") for name, fmt in formats.items()}, shared


def named(source, exc: LoraPipelineError) -> LoraPipelineError:
    """The same error, naming the source in the config first: 'dataset.sources[1] (chats): ...'."""
    return type(exc)(f"{source.key} ({source.name}): {exc}")


def read_source(source) -> LoadedDataset:
    """One source of a mixture read, and every row checked against its format (pandera); errors name the source."""
    try:
        loaded = load_dataset(source.dataset)
        if loaded.format in PREFERENCE_FORMATS:
            raise ConfigError(f"{loaded.source}: {loaded.format} rows cannot be mixed (preference tuning takes one "
                              "dataset.source)")
    except LoraPipelineError as exc:
        raise named(source, exc) from None
    return loaded


@dataclass
class CleanedMixture:
    """A mixture's sources, each read, checked against its format and cleaned on its own.

    mixture: the config's sources (config/mixture.py MixedSource: name, key, one-source dataset section,
    weight, train_rows); cleaned: each one's rows by name.
    """

    mixture: list
    cleaned: dict[str, CleanedRows]

    @classmethod
    def read(cls, mixture: list, dedupe: str) -> "CleanedMixture":
        """Read every source from where it is (what validate, run's early check and a built-in base do)."""
        cleaned = {}
        for source in mixture:
            loaded = read_source(source)
            try:
                cleaned[source.name] = clean_rows(loaded, dedupe)
            except LoraPipelineError as exc:
                raise named(source, exc) from None
        return cls(mixture, cleaned)

    @property
    def counts(self) -> dict[str, int]:
        """Cleaning's counts of all sources together."""
        return {key: sum(rows.counts[key] for rows in self.cleaned.values())
                for key in next(iter(self.cleaned.values())).counts}

    @property
    def formats(self) -> dict[str, str]:
        """Each source's row format (as given, or detected)."""
        return {name: rows.loaded.format for name, rows in self.cleaned.items()}

    @property
    def prompt_format(self) -> str:
        """The format the mixture's one template is chosen for (prompt_format)."""
        return prompt_format(list(self.formats.values()))

    @property
    def detected(self) -> bool:
        """Whether any source's format was detected rather than given."""
        return any(rows.loaded.detected for rows in self.cleaned.values())

    def summary(self) -> dict[str, dict]:
        """Per source, what validate reports of it: where from, its format, its rows, how much of it is trained on."""
        return {source.name: {"source": source.dataset.source, "format": self.cleaned[source.name].loaded.format,
                              "format_detected": self.cleaned[source.name].loaded.detected,
                              "share": source.share, **self.cleaned[source.name].counts}
                for source in self.mixture}

    def split_sizes(self, eval_fraction: float) -> tuple[int, int]:
        """(training, held-out) rows of all sources before weights and the token-length policy, both required."""
        held_out = sum(int(rows.held_out(eval_fraction).sum()) for rows in self.cleaned.values())
        train = sum(len(rows.hashes) for rows in self.cleaned.values()) - held_out
        require_both_splits(train, held_out, eval_fraction, "dataset.sources")
        return train, held_out

    def corpus(self, eval_fraction: float) -> list[str]:
        """What a built-in tokenizer learns from: each source's training texts, an equal share of the cap each."""
        each = max(TOKENIZER_CORPUS_ROWS // len(self.cleaned), 1)
        return [text for rows in self.cleaned.values() for text in tokenizer_corpus(rows, eval_fraction)[:each]]

    def to_format(self, settings: FormatSettings, template: str, tokenizer_template: str | None) -> list[SourceToFormat]:
        """Each source with the format settings it is formatted with: the mixture's one template (mixture_templates)
        and its own system prompt."""
        templates, _ = mixture_templates(template, self.formats, {s.name: s.key for s in self.mixture},
                                         tokenizer_template)
        return [SourceToFormat(source.name, source.key, self.cleaned[source.name],
                               replace(settings, template=templates[source.name],
                                       system_prompt=source.dataset.system_prompt),
                               source.weight, source.train_rows)
                for source in self.mixture]
