"""raw_dataset and formatted_dataset for a mixture (dataset.sources): each source read, checked and stored on its
own, a source unchanged since an earlier run reused instead of read again; then cleaned, formatted and mixed
(ml/data/mixture.py).

The raw_dataset artifact of a mixture holds one folder per source, sources/<name>/, laid out as a one-source
raw_dataset (rows.parquet, dataset_info.json), and a dataset_info.json listing the sources with each one's
content version and read key. The read key (the source's content version and the settings that decide which
rows reading gives) is remembered in the store against the artifact, so the next run finds the rows of every
source whose key is unchanged and copies them instead of reading and checking the source again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import dagster as dg
import pandas as pd

from lora_pipeline.assets.common import publish_stage, read_json, stage_lineage, stage_output, write_json
from lora_pipeline.config.mixture import MixedSource
from lora_pipeline.config.schema import ModelConfig
from lora_pipeline.errors import ConfigError, LoraPipelineError
from lora_pipeline.ml.data.clean import clean_rows
from lora_pipeline.ml.data.formatted import FormatSettings, FormattedDataset
from lora_pipeline.ml.data.mixing import format_mixture
from lora_pipeline.ml.data.mixture import CleanedMixture, named, read_key, read_source
from lora_pipeline.ml.data.raw import DATASET_INFO, rows_in_folder, source_request, write_rows
from lora_pipeline.ml.data.sources import source_version
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

SOURCES_DIR = "sources"
STAGE = "raw_dataset"
# Per-source keys that say how much of a source is trained on or how it is prompted, not which rows reading it
# gives: raw_dataset's version leaves them out (formatted_dataset reads them).
MIXING_ONLY = ("dataset.sources.weight", "dataset.sources.train_rows", "dataset.sources.system_prompt")


def mixture_names(folder: Path) -> list[str] | None:
    """The source names of a raw_dataset folder that holds a mixture, in the config's order; None for one source."""
    info = read_json(folder / DATASET_INFO)
    return [entry["name"] for entry in info["sources"]] if "sources" in info else None


def raw_mixture(context: dg.AssetExecutionContext, model_config: ModelConfig, storage: ArtifactStore,
                source_version_now: str) -> dg.Output[ArtifactRef]:
    """raw_dataset of a mixture: each source's rows into sources/<name>/, read and checked, or copied from an
    earlier raw_dataset when the source's read key is unchanged."""
    partition = context.partition_key
    entries, reused = [], {}
    with storage.staging_dir() as staging:
        for source in model_config.dataset.mixture:
            entry, earlier = _source_rows(storage, partition, source, staging / SOURCES_DIR / source.name)
            entries.append(entry)
            if earlier is not None:
                reused[source.name] = earlier
        rows = sum(entry["rows"] for entry in entries)
        combined = hashlib.sha256(json.dumps([[e["name"], e["fingerprint"]] for e in entries]).encode()).hexdigest()
        write_json(staging / DATASET_INFO, {"sources": entries, "rows": rows, "fingerprint": combined})
        versions = {entry["name"]: entry["version"] for entry in entries}
        record = stage_lineage(context, model_config, storage, {}, source_version=source_version_now,
                               dataset_fingerprint=combined, rows=rows, source_versions=versions)
        ref = publish_stage(context, storage, staging, record)
    for entry in entries:
        storage.remember(partition, STAGE, entry["read_key"], ref)
        how = f"reused from {reused[entry['name']]}" if entry["name"] in reused else "read"
        context.log.info(f"source {entry['name']}: {entry['rows']} {entry['format']} rows from {entry['source']} "
                         f"(version {entry['version']}; {how})")
    table = pd.DataFrame([{"source": e["name"], "from": e["source"], "format": e["format"]
                           + (" (detected)" if e["format_detected"] else ""), "rows": e["rows"],
                           "version": e["version"], "rows were": "reused" if e["name"] in reused else "read"}
                          for e in entries])
    return stage_output(ref, record, model_config, {
        "sources": dg.MetadataValue.md(table.to_markdown(index=False)),
        "source_versions": versions,
        "rows": rows,
        "fingerprint": combined,
        "read": ", ".join(e["name"] for e in entries if e["name"] not in reused) or "none (every source reused)",
        "reused": ", ".join(reused) or "none",
    })


def _source_rows(storage: ArtifactStore, partition: str, source: MixedSource, folder: Path) -> tuple[dict, str | None]:
    """One source's rows into folder, and its entry in the mixture's dataset_info.json; with the earlier artifact's
    uri when its rows were reused rather than read."""
    try:
        version = source_version(source_request(source.dataset))
    except LoraPipelineError as exc:
        raise named(source, exc) from None
    key = read_key(source.dataset, version)
    earlier = storage.remembered(partition, STAGE, key)
    if earlier is not None and _copy_rows(storage.local_path(earlier), key, folder):
        info = read_json(folder / DATASET_INFO)
    else:
        earlier = None
        loaded = read_source(source)  # read, and every row checked against its format (pandera)
        info = write_rows(loaded, folder, source.dataset.turn_flag_field)
        del loaded
    entry = {"name": source.name, "source": info["source"], "format": info["format"],
             "format_detected": info["format_detected"], "rows": info["rows"], "fingerprint": info["fingerprint"],
             "version": version, "read_key": key}
    return entry, earlier.uri if earlier is not None else None


def _copy_rows(earlier: Path, key: str, folder: Path) -> bool:
    """Copy the rows an earlier raw_dataset stored under this read key (whatever the source was named then)."""
    match = [entry["name"] for entry in read_json(earlier / DATASET_INFO).get("sources", []) if entry["read_key"] == key]
    if not match:
        return False
    shutil.copytree(earlier / SOURCES_DIR / match[0], folder)
    return True


def formatted_mixture(model_config: ModelConfig, settings: FormatSettings, storage: ArtifactStore, hub: ModelHub,
                      raw_dataset: ArtifactRef, staging: Path, log: Callable[[str], None]) -> FormattedDataset:
    """The mixture's formatted splits, written into staging: each source cleaned and formatted with its own format
    and system prompt under the mixture's one template, then mixed by weight."""
    folder = storage.local_path(raw_dataset)
    mixture = model_config.dataset.mixture
    stored = mixture_names(folder)
    if stored != [source.name for source in mixture]:
        raise ConfigError(f"raw_dataset holds the sources {', '.join(stored or [])}, the config names "
                          f"{', '.join(source.name for source in mixture)}: materialize raw_dataset again")
    cleaned = {}
    for source in mixture:
        try:
            cleaned[source.name] = clean_rows(rows_in_folder(folder / SOURCES_DIR / source.name),
                                              model_config.dataset.dedupe)
        except LoraPipelineError as exc:
            raise named(source, exc) from None
    rows = CleanedMixture(mixture, cleaned)
    tokenizer = hub.tokenizer(model_config.base_model, model_config.base_revision,
                              lambda: rows.corpus(settings.eval_fraction),
                              trust_remote_code=model_config.trust_remote_code)
    sources = rows.to_format(settings, model_config.dataset.template, tokenizer.chat_template)
    return format_mixture(sources, tokenizer, model_config.dataset.mix_seed, log, staging)


MIXTURE_COLUMNS = {
    "name": "source", "format": "format", "share": "share", "rows_read": "rows read",
    "rows_after_cleaning": "after cleaning", "train_rows_before": "train rows", "train_rows_after": "mixed train rows",
    "train_tokens_before": "train tokens", "train_tokens_after": "mixed train tokens",
    "train_token_share": "share of mixed tokens", "eval_rows": "eval rows",
}


def mixture_table(figures: list[dict]) -> str:
    """Each source's rows and tokens before and after mixing, as a markdown table."""
    frame = pd.DataFrame(figures)[list(MIXTURE_COLUMNS)].rename(columns=MIXTURE_COLUMNS)
    frame["share of mixed tokens"] = frame["share of mixed tokens"].map(lambda share: f"{share:.1%}")
    return frame.to_markdown(index=False)


def mixture_lines(figures: list[dict]) -> list[str]:
    """Each source's rows and tokens before and after mixing, a log line each."""
    return [f"source {f['name']} ({f['share']}): {f['train_rows_before']:,} -> {f['train_rows_after']:,} training rows, "
            f"{f['train_tokens_before']:,} -> {f['train_tokens_after']:,} tokens ({f['train_token_share']:.1%} of the "
            f"mixture's); {f['eval_rows']:,} held out" for f in figures]


def mixture_metadata(figures: list[dict], seed: int) -> dict:
    """formatted_dataset's metadata of a mixture: the per-source table, and the figures as plain values."""
    return {
        "sources": dg.MetadataValue.md(mixture_table(figures)),
        "mix_seed": seed,
        "source_train_rows": {f["name"]: f["train_rows_after"] for f in figures},
        "source_train_tokens": {f["name"]: f["train_tokens_after"] for f in figures},
        "source_eval_rows": {f["name"]: f["eval_rows"] for f in figures},
    }
